"""Data pipeline: COCO index, dataset over local/S3 images, transforms, samplers and loaders."""
