"""hippod: the hippo daemon (control plane). Never imports mlx; model math runs in runner processes."""

__version__ = "0.1.0"
