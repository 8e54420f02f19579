# deploy/: tests/deploy.rs checks the HAProxy configuration (`haproxy -c`),
# the Kubernetes manifests (`kubectl kustomize`, then kubernetes-validate,
# whose schemas ship inside the package, so it needs no network) and the
# compose file (check-jsonschema's bundled copy of the compose-spec schema).
APT_PACKAGES+=(haproxy)
PIP_PACKAGES+=(kubernetes-validate check-jsonschema)
