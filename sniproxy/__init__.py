"""sniproxy: an SNI-routing TLS passthrough proxy whose relay runs in the kernel."""
__version__ = "0.1.0"
