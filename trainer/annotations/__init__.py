"""Annotation formats: Pascal VOC parsing and COCO building. No torch imports here."""
