"""The control plane: the certificate authority and device provisioning (docs/provisioning.md)."""
