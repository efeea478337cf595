"""Drop-in integrations with other libraries (timm ViTs)."""
