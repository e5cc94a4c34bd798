"""mmfactory: recipes for training efficient multimodal models."""

__version__ = "0.1.0"
