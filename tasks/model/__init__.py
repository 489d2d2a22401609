"""Model helpers: backbones, running a model on a device, training, metrics and projections."""
