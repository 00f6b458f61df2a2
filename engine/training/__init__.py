"""Training and assessment of model packages: dataset, augmentation, trainer, fit, export, assess, model card."""
