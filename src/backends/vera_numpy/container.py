"""Containers of named layers: parameters as ``"<child>.<parameter>"``, and ``Sequential``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vera_numpy.layers import Layer, copy_into


class Container:
    """Named child layers seen as one set of parameters.

    ``parameters()`` and ``grads()`` prefix each child's names with ``"<child>."``;
    ``zero_grad``, ``train`` and ``eval`` reach every child.

    Parameters
    ----------
    children : mapping of str to Layer
        The child layers, by name (names must not contain ``"."`` twice over: any
        string works, but ``"."``-free names keep parameter names unambiguous).
    """

    def __init__(self, children: Mapping[str, Layer]) -> None:
        self.children: dict[str, Layer] = dict(children)
        self.training = True

    def parameters(self) -> dict[str, Any]:
        """Every child's trainable arrays, as ``"<child>.<name>"``."""
        return {
            f"{child}.{name}": value
            for child, layer in self.children.items()
            for name, value in layer.parameters().items()
        }

    def grads(self) -> dict[str, Any]:
        """Every child's accumulated gradients, as ``"<child>.<name>"``."""
        return {
            f"{child}.{name}": value for child, layer in self.children.items() for name, value in layer.grads().items()
        }

    def zero_grad(self) -> None:
        """Forget every child's gradients."""
        for layer in self.children.values():
            layer.zero_grad()

    def train(self, mode: bool = True) -> Container:
        """Put every child in training (or, with ``mode=False``, evaluation) mode."""
        self.training = mode
        for layer in self.children.values():
            layer.train(mode)
        return self

    def eval(self) -> Container:
        """Evaluation mode for every child."""
        return self.train(False)

    def load_parameters(self, values: Mapping[str, Any]) -> None:
        """Copy ``values`` into the parameters of the same names, in place."""
        copy_into(self.parameters(), values)


class Sequential(Container):
    """Layers applied in order; ``backward`` runs them in reverse.

    Parameters
    ----------
    *layers : Layer, or one mapping of str to Layer
        Unnamed layers are named ``"0"``, ``"1"``, ...

    Examples
    --------
    >>> import numpy as np
    >>> from vera_numpy import Linear, ReLU
    >>> net = Sequential(Linear(np.ones((4, 3))), ReLU(), Linear(np.ones((2, 4))))
    >>> net.forward(np.ones((5, 3))).shape
    (5, 2)
    >>> net.backward(np.ones((5, 2))).shape
    (5, 3)
    >>> sorted(net.grads())
    ['0.weight', '2.weight']
    """

    def __init__(self, *layers: Layer | Mapping[str, Layer]) -> None:
        named: dict[str, Any] = (
            dict(layers[0])
            if len(layers) == 1 and isinstance(layers[0], Mapping)
            else {str(i): layer for i, layer in enumerate(layers)}
        )
        for name, layer in named.items():
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes Layer objects; {name!r} is {type(layer).__name__}")
        super().__init__(named)

    def forward(self, x: Any) -> Any:
        """Each layer's forward, in order."""
        for layer in self.children.values():
            x = layer.forward(x)
        return x

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        """Each layer's backward, in reverse; the first layer computes ``dL/dx`` only if ``input_grad``."""
        layers = list(self.children.values())
        for position, layer in enumerate(reversed(layers)):
            grad_y = layer.backward(grad_y, input_grad=input_grad or position < len(layers) - 1)
        return grad_y
