"""Outputs for detection results: JSON lines, MQTT, HTTP, snapshots."""
