"""VeRA and DVoRA adapters on a model given as a mapping of names to weight arrays.

A weight dictionary (as loaded from a safetensors file) names each dense layer's weight
``"<layer>.weight"`` (2-D) and its bias ``"<layer>.bias"``. :func:`add_vera` picks the
target layers by name (PEFT's rules, :func:`vera_core.targets.select_targets`), draws
the shared projections on the weights' device and returns an :class:`AdaptedModel`:
the adapted layers by name, their vectors as parameters named as in the adapter file
(``"<layer>.lambda_d"``, ``"<layer>.lambda_b"``, ``"<layer>.magnitude"``,
``"<layer>.bias"``), merge/unmerge into copies of the weight dictionary, save and load.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import vera_core as vc
from vera_core.adapter_file import AdapterConfig, AdapterFileError, LayerSpec, check_adapter_options
from vera_core.targets import ALL_LINEAR, select_targets
from vera_numpy import files
from vera_numpy._backend import Backend
from vera_numpy.container import Container
from vera_numpy.layers import AdaptedLinear, DVoraLinear, Layer, Linear, VeraLinear

WEIGHT_SUFFIX = ".weight"
BIAS_SUFFIX = ".bias"
OUTPUT_HEAD = "lm_head"
"""Layers of this name are left out of ``"all-linear"`` (as PEFT and vera_torch do)."""


def linear_layers(weights: Mapping[str, Any]) -> list[str]:
    """The names of the dense layers in ``weights``: every 2-D ``"<name>.weight"``, in order.

    Examples
    --------
    >>> import numpy as np
    >>> linear_layers({"fc.weight": np.zeros((2, 3)), "fc.bias": np.zeros(2), "ln.weight": np.zeros(3)})
    ['fc']
    """
    return [
        key[: -len(WEIGHT_SUFFIX)] for key, value in weights.items() if key.endswith(WEIGHT_SUFFIX) and value.ndim == 2
    ]


def _features(weight: Any, fan_in_fan_out: bool) -> tuple[int, int]:
    rows, cols = weight.shape
    return (cols, rows) if fan_in_fan_out else (rows, cols)


def checked_layers(weights: Mapping[str, Any], config: AdapterConfig) -> dict[str, LayerSpec]:
    """``config.layers`` checked against the dense layers of ``weights``, with ``in_features`` filled in.

    Raises AdapterFileError naming the first layer the weights lack or whose sizes differ.
    """
    available = linear_layers(weights)
    specs: dict[str, LayerSpec] = {}
    for name, spec in config.layers.items():
        if name not in available:
            raise AdapterFileError(
                f"the adapter targets layer {name!r}, which the weights lack (no 2-D {name + WEIGHT_SUFFIX!r}); "
                f"dense layers: {', '.join(available) or 'none'}"
            )
        out_features, in_features = _features(weights[name + WEIGHT_SUFFIX], spec.fan_in_fan_out)
        if out_features != spec.out_features or spec.in_features not in (None, in_features):
            raise AdapterFileError(
                f"layer {name!r}: the adapter expects (out, in) = ({spec.out_features}, {spec.in_features}) "
                f"but the weight gives ({out_features}, {in_features})"
            )
        specs[name] = dataclasses.replace(spec, in_features=in_features)
    return specs


def new_config(
    weights: Mapping[str, Any],
    target_modules: str | Sequence[str],
    *,
    r: int,
    seed: int,
    d_initial: float,
    dvora: bool,
    bias: str,
    dropout: float,
    fan_in_fan_out: bool,
    detach_norm: bool,
    layers_to_transform: int | Sequence[int] | None,
    layers_pattern: str | Sequence[str] | None,
) -> AdapterConfig:
    """The config of a new adapter on the dense layers of ``weights`` that ``target_modules`` picks (PEFT's rules).

    Every layer gets rank ``r``; the shared sizes are the largest of the picked layers.
    Raises ValueError when nothing matches.
    """
    if not weights:
        raise ValueError("the weight dictionary is empty")
    check_adapter_options(r, seed, d_initial, dropout, bias)
    candidates = linear_layers(weights)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        candidates = [name for name in candidates if name.split(".")[-1] != OUTPUT_HEAD]
    names = select_targets(
        candidates, target_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern
    )
    sizes = {name: _features(weights[name + WEIGHT_SUFFIX], fan_in_fan_out) for name in names}
    specs = {name: LayerSpec(out_f, r, in_f, fan_in_fan_out) for name, (out_f, in_f) in sizes.items()}
    return AdapterConfig(
        r=r,
        seed=seed,
        max_in=max(in_f for _, in_f in sizes.values()),
        max_out=max(out_f for out_f, _ in sizes.values()),
        layers=specs,
        method="dvora" if dvora else "vera",
        d_initial=d_initial,
        dropout=dropout,
        bias=bias,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        extra={"framework": "numpy", **({"detach_norm": detach_norm} if dvora else {})},
    )


class AdaptedModel(Container):
    """The adapted layers of a weight dictionary, sharing one pair of projections.

    Made by :func:`add_vera` or :meth:`load`. ``parameters()`` and ``grads()`` use the
    adapter file's names (``"<layer>.lambda_d"``, ...). The frozen weights are never
    modified.

    Parameters
    ----------
    weights : mapping of str to array
        The frozen model.
    config : AdapterConfig
        Which layers, ranks and options.
    A, B : array
        The shared projections on the weights' device.
    backend : Backend
        Namespace, device and host conversion of the weights.
    dropout_seed : int
        Layer ``i`` (in ``config.layers`` order) draws its dropout masks from stream
        ``dropout_seed + i``.
    detach_norm : bool
        DVoRA: treat the norm as a constant in backward.
    """

    def __init__(
        self,
        weights: Mapping[str, Any],
        config: AdapterConfig,
        A: Any,
        B: Any,
        *,
        backend: Backend,
        dropout_seed: int = 0,
        detach_norm: bool = False,
    ) -> None:
        self.weights = dict(weights)
        self.backend = backend
        self.A, self.B = A, B
        specs = checked_layers(self.weights, config)
        children: dict[str, AdaptedLinear] = {}
        for index, (name, spec) in enumerate(specs.items()):
            weight = self.weights[name + WEIGHT_SUFFIX]
            options: dict[str, Any] = {"detach_norm": detach_norm} if config.method == "dvora" else {}
            layer_class = DVoraLinear if config.method == "dvora" else VeraLinear
            children[name] = layer_class(
                weight,
                A,
                B,
                bias=self.weights.get(name + BIAS_SUFFIX),
                rank=spec.rank,
                d_initial=config.d_initial,
                train_bias=config.bias != "none",
                fan_in_fan_out=spec.fan_in_fan_out,
                dropout=config.dropout,
                seed=(dropout_seed + index) % 2**32,
                **options,
            )
        super().__init__(children)
        self.adapted = children
        """The adapted layers by name (the same objects as ``children``)."""
        self.config = dataclasses.replace(config, layers=specs)
        self._frozen: dict[str, Linear] = {}
        self._merge_norms: dict[str, Any] = {}

    @property
    def targets(self) -> list[str]:
        """The adapted layers' names."""
        return list(self.children)

    def layer(self, name: str) -> Layer:
        """The layer ``name``: its adapted layer, or a frozen :class:`Linear` for an untargeted dense layer."""
        if name in self.adapted:
            return self.adapted[name]
        if name not in self._frozen:
            if name not in linear_layers(self.weights):
                raise KeyError(
                    f"no dense layer {name!r} in the weights; adapted: {', '.join(self.targets)}; "
                    f"all: {', '.join(linear_layers(self.weights))}"
                )
            fan_in_fan_out = next(iter(self.config.layers.values())).fan_in_fan_out
            self._frozen[name] = Linear(
                self.weights[name + WEIGHT_SUFFIX],
                self.weights.get(name + BIAS_SUFFIX),
                trainable=False,
                fan_in_fan_out=fan_in_fan_out,
            )
        return self._frozen[name]

    def _layer_weight(self, weights: Mapping[str, Any], name: str) -> Any:
        key = name + WEIGHT_SUFFIX
        if key not in weights:
            raise KeyError(f"the weights have no {key!r}")
        weight, expected = weights[key], self.weights[key]
        if tuple(weight.shape) != tuple(expected.shape):
            raise ValueError(f"{key!r} has shape {tuple(weight.shape)}, the adapted model {tuple(expected.shape)}")
        return weight

    def merge(self, weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A new weight dictionary with the adapters merged in (trained biases replace the old ones).

        ``weights`` defaults to the frozen weights the model was made with; untargeted
        entries are passed through unchanged. DVoRA keeps the norms for :meth:`unmerge`.
        """
        source = self.weights if weights is None else weights
        merged = dict(source)
        for name, layer in self.adapted.items():
            weight = self._layer_weight(source, name)
            fan = layer.fan_in_fan_out
            if isinstance(layer, DVoraLinear):
                merged[name + WEIGHT_SUFFIX], self._merge_norms[name] = vc.dvora_merge(
                    weight, self.A, self.B, layer.magnitude, layer.lambda_d, layer.lambda_b, fan_in_fan_out=fan
                )
            else:
                merged[name + WEIGHT_SUFFIX] = vc.merge(
                    weight, self.A, self.B, layer.lambda_d, layer.lambda_b, fan_in_fan_out=fan
                )
            if layer.train_bias:
                original = self.weights[name + BIAS_SUFFIX]
                merged[name + BIAS_SUFFIX] = self.backend.xp.astype(layer.bias, original.dtype)
        return merged

    def unmerge(self, merged: Mapping[str, Any]) -> dict[str, Any]:
        """Undo :meth:`merge` (up to rounding) on a merged dictionary; trained biases get their old values.

        DVoRA needs the norms of this model's last :meth:`merge` (ValueError otherwise).
        """
        restored = dict(merged)
        for name, layer in self.adapted.items():
            weight = self._layer_weight(merged, name)
            fan = layer.fan_in_fan_out
            if isinstance(layer, DVoraLinear):
                if name not in self._merge_norms:
                    raise ValueError(f"DVoRA unmerge needs the norms of a merge: call merge() first (layer {name!r})")
                restored[name + WEIGHT_SUFFIX] = vc.dvora_unmerge(
                    weight,
                    self._merge_norms[name],
                    self.A,
                    self.B,
                    layer.magnitude,
                    layer.lambda_d,
                    layer.lambda_b,
                    fan_in_fan_out=fan,
                )
            else:
                restored[name + WEIGHT_SUFFIX] = vc.unmerge(
                    weight, self.A, self.B, layer.lambda_d, layer.lambda_b, fan_in_fan_out=fan
                )
            if layer.train_bias:
                restored[name + BIAS_SUFFIX] = self.weights[name + BIAS_SUFFIX]
        return restored

    def save(self, path: str | os.PathLike[str], *, save_projections: bool = False) -> None:
        """Write the adapter file (vectors, config, projection checksum; projections if asked)."""
        files.save(
            path, self.config, self.parameters(), self.A, self.B, self.backend, save_projections=save_projections
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        weights: Mapping[str, Any],
        *,
        backend: Backend | None = None,
        dropout_seed: int = 0,
        detach_norm: bool | None = None,
        max_bytes: int | None = None,
    ) -> AdaptedModel:
        """Attach the adapter at ``path`` (a vera-core file or a PEFT VeRA folder) to ``weights``.

        The adapter is read and verified by :func:`vera_core.loading.read_adapter` (byte
        budget ``max_bytes``, see :func:`vera_core.loading.byte_budget`), then checked
        against the weights; ``weights`` is never modified. ``detach_norm`` defaults to
        the file's ``extra["detach_norm"]`` (False when absent). Raises AdapterFileError
        (or a subclass) when the file is malformed, does not fit the weights, or its
        projections' checksum disagrees.
        """
        if not weights:
            raise ValueError("the weight dictionary is empty")
        backend = Backend.of(next(iter(weights.values()))) if backend is None else backend

        def widest_input(config: AdapterConfig) -> int:
            layers = config.layers.items()
            return max(_features(_dense_weight(weights, name), spec.fan_in_fan_out)[1] for name, spec in layers)

        adapter, vectors, A, B = files.load(path, backend, widest_input, max_bytes=max_bytes)
        config = adapter.config
        if config.max_in is None:
            config = dataclasses.replace(config, max_in=int(A.shape[1]))
        weights, vectors = _apply_other_biases(path, config, weights, vectors, backend)
        if detach_norm is None:
            detach_norm = config.detach_norm
        model = cls(weights, config, A, B, backend=backend, dropout_seed=dropout_seed, detach_norm=detach_norm)
        model.load_parameters(vectors)
        return model


def _dense_weight(weights: Mapping[str, Any], name: str) -> Any:
    """The 2-D weight of layer ``name``; AdapterFileError naming the dense layers otherwise."""
    weight = weights.get(name + WEIGHT_SUFFIX)
    if weight is None or weight.ndim != 2:
        available = linear_layers(weights)
        raise AdapterFileError(
            f"the adapter targets layer {name!r}, which the weights lack (no 2-D {name + WEIGHT_SUFFIX!r}); "
            f"dense layers: {', '.join(available) or 'none'}"
        )
    return weight


def _apply_other_biases(
    path: str | os.PathLike[str],
    config: AdapterConfig,
    weights: Mapping[str, Any],
    vectors: dict[str, Any],
    backend: Backend,
) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """Biases the file trained outside its adapted layers (``bias="all"``) replace the frozen ones."""
    if not config.bias_modules:
        return weights, vectors
    replaced = dict(weights)
    for name, size in config.bias_modules.items():
        key = name + BIAS_SUFFIX
        if key not in weights or tuple(weights[key].shape) != (size,):
            got = "none" if key not in weights else f"shape {tuple(weights[key].shape)}"
            raise AdapterFileError(f"{path}: the adapter trained {key!r} of shape ({size},) but the weights have {got}")
        replaced[key] = backend.xp.astype(vectors[key], weights[key].dtype)
    remaining = {k: v for k, v in vectors.items() if k.removesuffix(BIAS_SUFFIX) not in config.bias_modules}
    return replaced, remaining


def add_vera(
    weights: Mapping[str, Any],
    target_modules: str | Sequence[str],
    *,
    r: int = 256,
    seed: int = 0,
    d_initial: float = 0.1,
    dvora: bool = False,
    bias: str = "none",
    dropout: float = 0.0,
    fan_in_fan_out: bool = False,
    detach_norm: bool = False,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    dropout_seed: int = 0,
    backend: Backend | None = None,
) -> AdaptedModel:
    """Attach a new VeRA (or, with ``dvora=True``, DVoRA) adapter to the dense layers of ``weights``.

    Parameters
    ----------
    weights : mapping of str to array
        ``"<layer>.weight"`` (out, in) and optional ``"<layer>.bias"``; never modified.
    target_modules : str or list of str
        PEFT's rules: a regular expression for the whole name, a list of names or name
        suffixes, or ``"all-linear"`` (every dense layer but one named ``lm_head``).
    r : int
        Shared rank (every layer uses all of it).
    seed : int
        Projection seed in ``[0, 2**64)``.
    d_initial : float
        Initial ``lambda_d``.
    dvora : bool
        DVoRA instead of VeRA (adds a trainable ``magnitude`` per layer).
    bias : {"none", "vera_only", "all"}
        ``"none"`` freezes the biases; the others train the adapted layers' biases.
    dropout : float
        Dropout on each adapter path's input, in training mode.
    fan_in_fan_out : bool
        Weights are stored (in, out).
    detach_norm : bool
        DVoRA: the norm is a constant in backward.
    layers_to_transform, layers_pattern
        PEFT's layer-index filter.
    dropout_seed : int
        First dropout stream (see :class:`AdaptedModel`).
    backend : Backend, optional
        Default: that of the weights.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> w = {"fc1.weight": rng.standard_normal((8, 4), dtype=np.float32), "fc1.bias": np.zeros(8, np.float32),
    ...      "fc2.weight": rng.standard_normal((3, 8), dtype=np.float32)}
    >>> model = add_vera(w, ["fc1"], r=4)
    >>> model.targets, sorted(model.parameters())
    (['fc1'], ['fc1.lambda_b', 'fc1.lambda_d'])
    >>> y = model.layer("fc1").forward(np.ones((2, 4), np.float32))
    >>> bool(np.allclose(model.merge()["fc1.weight"], w["fc1.weight"]))  # lambda_b starts at 0
    True
    """
    config = new_config(
        weights,
        target_modules,
        r=r,
        seed=seed,
        d_initial=d_initial,
        dvora=dvora,
        bias=bias,
        dropout=dropout,
        fan_in_fan_out=fan_in_fan_out,
        detach_norm=detach_norm,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    backend = Backend.of(next(iter(weights.values()))) if backend is None else backend
    A, B = files.projections(config, backend)
    return AdaptedModel(weights, config, A, B, backend=backend, dropout_seed=dropout_seed, detach_norm=detach_norm)
