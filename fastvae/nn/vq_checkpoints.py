"""Checkpoint layouts of other VQ libraries, translated in one place (VectorQuantizer.from_state_dict)."""
import torch

LAYOUTS = ("fastvae", "taming", "vector_quantize_pytorch")


def _take(state_dict, prefix, key, layout, required=True):
    value = state_dict.get(prefix + key)
    if value is None and required:
        found = sorted(k for k in state_dict if k.startswith(prefix))[:8]
        raise KeyError(f"layout={layout!r} expects the key {prefix + key!r}; keys under prefix {prefix!r}: {found} "
                       "(pass prefix= to select the quantizer inside a model's state dict)")
    return value


def build_from_state_dict(cls, state_dict, layout, prefix, options):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    translate = {"fastvae": _fastvae, "taming": _taming, "vector_quantize_pytorch": _vector_quantize_pytorch}[layout]
    defaults, own_state = translate(state_dict, prefix, layout)
    kwargs = {**defaults, **options}
    layer = cls(**kwargs)
    expected = layer.state_dict()
    if "ema_sum" not in expected:  # EMA state of a checkpoint loaded into a gradient-trained codebook
        own_state.pop("ema_sum", None)
        if "ema_count" not in expected:
            own_state.pop("ema_count", None)
    layer.load_state_dict({**_missing_statistics(layer, own_state, expected), **own_state})
    return layer


def _missing_statistics(layer, own_state, expected):
    """The statistics the options ask for and the checkpoint lacks (a gradient-trained codebook
    loaded into EMA mode or with dead-code restarts, say), as a new layer's around the
    checkpoint's codes: each code one pseudo-assignment (EMA sums to match the checkpoint's
    counts where it has them), and a codebook that k-means need not fit again."""
    codebook = own_state.get("codebook")
    if codebook is None:
        return {}
    fresh = layer._initial_statistics(codebook)
    if "ema_count" in own_state and "ema_sum" in fresh and not layer.ema_debias:
        dtype = fresh["ema_sum"].dtype
        fresh["ema_sum"] = codebook.to(dtype) * own_state["ema_count"].to(dtype)[:, None]
    fresh["initialized"] = torch.ones((), dtype=torch.bool)
    return {name: value for name, value in fresh.items() if name in expected and name not in own_state}


def _projection_sizes(state_dict, prefix, codebook):
    """(dim, codebook_dim) from project_in when there is one."""
    weight = state_dict.get(prefix + "project_in.weight")
    if weight is None:
        return codebook.shape[1], None
    return weight.shape[1], weight.shape[0]


def _fastvae(state_dict, prefix, layout):
    codebook = _take(state_dict, prefix, "codebook", layout)
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    dim, codebook_dim = _projection_sizes(state_dict, prefix, codebook)
    defaults = {"num_codes": codebook.shape[0], "dim": dim, "codebook_dim": codebook_dim,
                "dtype": codebook.dtype}
    if "ema_sum" in own:
        defaults["ema_decay"] = 0.99
    if "ema_count" in own and "ema_sum" not in own:
        defaults["dead_code_threshold"] = 1.0  # the count exists only with a threshold; pass the real one
    if "ema_steps" in own:
        defaults["ema_debias"] = True
    if "initialized" in own:
        defaults["kmeans_init"] = True
    return defaults, own


def _taming(state_dict, prefix, layout):
    weight = _take(state_dict, prefix, "embedding.weight", layout)
    return {"num_codes": weight.shape[0], "dim": weight.shape[1], "channel_dim": 1, "dtype": weight.dtype}, \
        {"codebook": weight}


def _vector_quantize_pytorch(state_dict, prefix, layout):
    embed = _take(state_dict, prefix, "_codebook.embed", layout)
    if embed.dim() != 3 or embed.shape[0] != 1:
        raise ValueError(f"only single-codebook VectorQuantize checkpoints (heads=1) are supported; "
                         f"_codebook.embed has shape {tuple(embed.shape)}")
    embed = embed[0]
    dim, codebook_dim = _projection_sizes(state_dict, prefix, embed)
    own = {"codebook": embed}
    defaults = {"num_codes": embed.shape[0], "dim": dim, "codebook_dim": codebook_dim, "beta": 1.0,
                "estimator": "rotation" if dim > 1 else "ste", "dtype": embed.dtype}
    embed_avg = _take(state_dict, prefix, "_codebook.embed_avg", layout, required=False)
    cluster_size = _take(state_dict, prefix, "_codebook.cluster_size", layout, required=False)
    if embed_avg is not None and cluster_size is not None:
        defaults["ema_decay"] = 0.8
        own["ema_sum"] = embed_avg[0].float()
        own["ema_count"] = cluster_size[0].float()
    for name in ("weight", "bias"):
        for projection in ("project_in", "project_out"):
            value = state_dict.get(f"{prefix}{projection}.{name}")
            if value is not None:
                own[f"{projection}.{name}"] = value
    initted = state_dict.get(prefix + "_codebook.initted")
    if initted is not None and not bool(initted):
        defaults["kmeans_init"] = True
        own["initialized"] = torch.zeros((), dtype=torch.bool)
    return defaults, own

