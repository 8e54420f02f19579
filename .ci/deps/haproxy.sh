# tests/cluster.rs: three gateway replicas behind HAProxy (mode tcp, health
# checks on /readyz), and a redis-server of the test's own that it can stop.
APT_PACKAGES+=(haproxy redis-server)
