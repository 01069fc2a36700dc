"""Ray Serve entry points (`serve run serve.app:app`, `serve deploy serve/config.yaml`); logic lives in jbert_ray."""
