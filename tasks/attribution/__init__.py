"""Attribution helpers: layers and their layouts, CAM methods, guided backprop, and the evidence that maps reflect the model."""
