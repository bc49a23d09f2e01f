"""dsonas: single-shot neural architecture search by direct sparse optimization (DSO-NAS) in MXNet Gluon."""

__version__ = "0.1.0"
