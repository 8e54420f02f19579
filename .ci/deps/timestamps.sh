# tests/timestamps.rs: `openssl ts -reply` is the test double for an RFC 3161
# time-stamping authority; `openssl req` makes its key and certificate.
APT_PACKAGES+=(openssl)
