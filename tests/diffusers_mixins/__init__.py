"""Vendored subset of diffusers' test mixins (see README.md in this folder)."""
