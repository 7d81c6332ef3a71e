"""`sidecar inject`: add the sidecar to annotated pods (docs/kubernetes.md).

Pure modules (no aiohttp): `annotations` reads and validates the pod's
annotations, `pod` builds the sidecar and the JSON patch, `jsonpatch` the RFC
6902 subset, `review` the AdmissionReview exchange, `manifests` the offline
`--dry-run`. `certs` writes the bootstrap certificates; `webhook` is the only
I/O shell.
"""
