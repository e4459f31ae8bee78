"""Test helpers that start real servers and build tiny real models."""
