"""Tests of vera_numpy and vera_cupy (the array backends without autograd)."""
