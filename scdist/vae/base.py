"""What LDVAE and MrVI share as user-facing models: data checks, training orchestration
(in-process or Ray Train), streaming inference over cell chunks, save / load.

A model = a torch module (rebuilt from ``module_kwargs``) + the covariate categories and gene
names it was trained on + the training history. The count data stays outside: inference
methods take ``data`` (defaulting to the training data when the model still holds it).
"""
from __future__ import annotations

import importlib
import io
import json
from dataclasses import asdict, fields
from typing import Any, Iterator

import numpy as np
import torch
import xarray as xr

from ..errors import InputError
from .data import COVARIATES, CellLoader, CountSource, as_source, check_counts
from .train import CheckpointDir, History, TrainConfig, fit

ENGINE_OPTIONS = ("num_workers", "use_gpu", "checkpoint_dir", "engine", "timeout_s", "ray_storage", "run_name",
                  "max_failures")


def split_options(options: dict, module_keys: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """Split ``**options`` into (module kwargs, TrainConfig kwargs, engine kwargs); unknown keys fail."""
    train_keys = {f.name for f in fields(TrainConfig)}
    mod, tr, eng = {}, {}, {}
    for k, v in options.items():
        if k in module_keys:
            mod[k] = v
        elif k in train_keys:
            tr[k] = v
        elif k in ENGINE_OPTIONS:
            eng[k] = v
        else:
            allowed = sorted(set(module_keys) | train_keys | set(ENGINE_OPTIONS))
            raise InputError(f"unknown option {k!r}", field=k, fix=f"use one of {allowed}")
    return mod, tr, eng


def cell_names(source: CountSource) -> np.ndarray:
    obs = getattr(source, "obs", None)
    if obs is None and hasattr(source, "_obs_frame"):
        obs = source._obs_frame()
    if obs is not None and len(obs.index) == source.n_cells:
        return np.asarray(obs.index.astype(str), dtype=object)
    return np.arange(source.n_cells).astype(str).astype(object)


class VAEModel:
    """Base of the user-facing model classes. Subclasses set ``module_path`` ("pkg.mod:Class")."""

    module_path: str = ""
    method: str = ""

    def __init__(self, module: torch.nn.Module, module_kwargs: dict, *, gene_names, categories: dict,
                 keys: dict, train_config: dict, history: History | None = None, source: CountSource | None = None):
        self.module = module.eval()
        self.module_kwargs = module_kwargs
        self.gene_names = np.asarray(gene_names, dtype=object)
        self.categories = categories  # covariate name -> list of labels
        self.keys = keys              # covariate name -> obs key (or None)
        self.train_config = train_config
        self.history = history or History()
        self._source = source

    # ------------------------------------------------------------------ building / training
    @classmethod
    def _module_cls(cls):
        mod, name = cls.module_path.split(":")
        return getattr(importlib.import_module(mod), name)

    @classmethod
    def _train(cls, data, keys: dict, module_kwargs: dict, train_kwargs: dict, engine: dict,
               *, seed: int, prepare=None) -> "VAEModel":
        source = as_source(data)
        check_counts(source)
        cats = {name: source.categorical(keys.get(name)) for name in COVARIATES}
        cfg = TrainConfig(seed=seed, **train_kwargs)
        module_kwargs = dict(module_kwargs, n_genes=source.n_genes, n_batch=cats["batch"].n,
                             n_sample=cats["sample"].n, n_label=cats["label"].n)
        if prepare is not None:
            module_kwargs = prepare(source, cats, module_kwargs)
        probe = CellLoader(source, cats, batch_size=cfg.batch_size, split="train",
                           val_fraction=cfg.val_fraction, split_seed=seed)
        n_train = probe.n_cells()
        if n_train < cfg.batch_size:
            raise InputError(f"only {n_train} training cells for batch_size={cfg.batch_size}", field="batch_size",
                             fix="lower batch_size or pass more cells")
        cfg = cfg.resolve(n_train)
        fingerprint = settings_fingerprint(module_kwargs, cfg, keys, source)
        ckpt_url = engine.get("checkpoint_dir")
        if ckpt_url is None and hasattr(data, "result_url"):
            ckpt_url = f"{data.result_url(cls.method, engine.get('run_name', 'default'))}/checkpoints"
        num_workers = int(engine.get("num_workers", 1))
        use_gpu = bool(engine.get("use_gpu", False))
        use_ray = engine.get("engine", "ray" if (num_workers > 1 or use_gpu) else "local") == "ray"
        if use_ray:
            if len(source.chunks) < num_workers:
                raise InputError(f"{len(source.chunks)} cell chunks cannot feed {num_workers} workers",
                                 field="num_workers", fix=f"use at most {len(source.chunks)} workers")
            from ..engines.ray_train import train_distributed
            state, history = train_distributed(
                module_path=cls.module_path, module_kwargs=module_kwargs, source=source, covariates=cats,
                config=cfg, checkpoint_dir=ckpt_url, num_workers=num_workers, use_gpu=use_gpu,
                run_name=engine.get("run_name") or f"scdist-{cls.method}",
                storage_path=engine.get("ray_storage"), timeout_s=engine.get("timeout_s"), fingerprint=fingerprint,
                **({"max_failures": engine["max_failures"]} if "max_failures" in engine else {}))
            module = cls._module_cls()(**module_kwargs)
            module.load_state_dict(state)
        else:
            module, history = run_local(cls.module_path, module_kwargs, source, cats, cfg, ckpt_url, fingerprint)
        return cls(module, module_kwargs, gene_names=source.gene_names,
                   categories={k: v.categories for k, v in cats.items()}, keys=keys,
                   train_config=asdict(cfg), history=history, source=source)

    # ------------------------------------------------------------------ inference helpers
    def _resolve(self, data) -> tuple[CountSource, dict]:
        if data is None:
            if self._source is None:
                raise InputError("this model holds no data (it was loaded from disk)", field="data",
                                 fix="pass the AnnData or study to compute on")
            source = self._source
        else:
            source = as_source(data)
        if source.n_genes != len(self.gene_names) or not np.array_equal(
                np.asarray(source.gene_names, dtype=str), np.asarray(self.gene_names, dtype=str)):
            raise InputError("genes differ from the training genes", field="var_names",
                             fix="subset / order the data's genes as in training (model.gene_names)")
        cats = {name: source.categorical(self.keys.get(name), self.categories[name]) for name in COVARIATES}
        return source, cats

    def iter_batches(self, data=None, *, batch_size: int = 1024, cells=None) -> Iterator[dict]:
        """Minibatches over all cells in index order (``cells``: optional index array to keep)."""
        source, cats = self._resolve(data)
        loader = CellLoader(source, cats, batch_size=batch_size, split="all", shuffle=False)
        if cells is not None:
            keep = np.zeros(source.n_cells, bool)
            keep[np.asarray(cells)] = True
            starts = np.array([a for a, _ in source.chunks])
            loader.cell_mask = keep
            loader.chunk_ids = np.unique(np.searchsorted(starts, np.flatnonzero(keep), side="right") - 1).tolist()
        yield from loader

    def _cells(self, data, cells=None) -> np.ndarray:
        source, _ = self._resolve(data)
        names = cell_names(source)
        return names if cells is None else names[np.asarray(cells)]

    @torch.no_grad()
    def evaluate(self, data=None, split: str = "val") -> dict[str, float]:
        """Negative ELBO and reconstruction NLL per cell on ``split`` ("val" = held-out cells)."""
        from .train import evaluate as _eval
        source, cats = self._resolve(data)
        loader = CellLoader(source, cats, batch_size=1024, split=split, shuffle=False,
                            val_fraction=self.train_config["val_fraction"], split_seed=self.train_config["seed"])
        with torch.random.fork_rng(devices=[]):  # fixed draws, the caller's RNG left alone
            torch.manual_seed(0)
            return _eval(self.module, loader)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Write ``config.json`` and ``weights.pt`` under directory ``path`` (local or fsspec URL)."""
        import fsspec
        fs, root = fsspec.core.url_to_fs(str(path))
        fs.makedirs(root, exist_ok=True)
        buf = io.BytesIO()
        torch.save(self.module.state_dict(), buf)
        with fs.open(f"{root}/weights.pt", "wb") as f:
            f.write(buf.getvalue())
        meta = {"class": f"{type(self).__module__}:{type(self).__name__}", "module_path": self.module_path,
                "module_kwargs": self.module_kwargs, "gene_names": [str(g) for g in self.gene_names],
                "categories": self.categories, "keys": self.keys, "train_config": self.train_config,
                "history": asdict(self.history)}
        with fs.open(f"{root}/config.json", "w") as f:  # written last: its presence means complete
            json.dump(meta, f, default=_jsonable)

    @classmethod
    def load(cls, path: str) -> "VAEModel":
        import fsspec
        fs, root = fsspec.core.url_to_fs(str(path))
        if not fs.exists(f"{root}/config.json"):
            raise InputError(f"no saved model at {path!r}", field="path", fix="pass a directory written by model.save()")
        with fs.open(f"{root}/config.json", "r") as f:
            meta = json.load(f)
        mod, name = meta["class"].split(":")
        klass = getattr(importlib.import_module(mod), name)
        if not issubclass(klass, cls):
            raise InputError(f"{path!r} holds a {name}, not a {cls.__name__}", field="path",
                             fix=f"load it with {name}.load")
        module = klass._module_cls()(**meta["module_kwargs"])
        with fs.open(f"{root}/weights.pt", "rb") as f:
            module.load_state_dict(torch.load(io.BytesIO(f.read()), map_location="cpu"))
        return klass(module, meta["module_kwargs"], gene_names=meta["gene_names"], categories=meta["categories"],
                     keys=meta["keys"], train_config=meta["train_config"], history=History(**meta["history"]))


def _jsonable(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def make_loaders(source, cats, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1):
    """Train loader (shuffled shard, fixed steps per epoch) and validation loader for one worker."""
    train = CellLoader(source, cats, batch_size=cfg.batch_size, split="train", val_fraction=cfg.val_fraction,
                       split_seed=cfg.seed, seed=cfg.seed, shuffle=True, buffer_chunks=cfg.buffer_chunks,
                       rank=rank, world_size=world_size)
    train.n_steps = train.steps_per_epoch()
    val = None
    if cfg.val_fraction > 0:
        val = CellLoader(source, cats, batch_size=1024, split="val", val_fraction=cfg.val_fraction,
                         split_seed=cfg.seed, shuffle=False, rank=rank, world_size=world_size)
        if val.n_cells() == 0:
            val = None
    return train, val


def build_module(module_path: str, module_kwargs: dict, seed: int) -> torch.nn.Module:
    mod, name = module_path.split(":")
    torch.manual_seed(seed)
    return getattr(importlib.import_module(mod), name)(**module_kwargs)


def settings_fingerprint(module_kwargs: dict, cfg: TrainConfig, keys: dict, source) -> str:
    """Hash of what defines a training run (model, settings, covariate keys, data shape)."""
    import hashlib
    blob = json.dumps({"module": module_kwargs, "train": asdict(cfg), "keys": keys,
                       "shape": [source.n_cells, source.n_genes]}, sort_keys=True, default=_jsonable)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_local(module_path, module_kwargs, source, cats, cfg: TrainConfig, checkpoint_dir: str | None,
              fingerprint: str | None = None):
    """In-process training (one worker)."""
    module = build_module(module_path, module_kwargs, cfg.seed)
    train, val = make_loaders(source, cats, cfg)
    ckpt = CheckpointDir(checkpoint_dir) if checkpoint_dir else None
    history = fit(module, train, val, cfg, checkpoints=ckpt, fingerprint=fingerprint)
    return module.eval(), history


def latent_dataarray(values: np.ndarray, cells, name: str, latent_prefix: str = "") -> xr.DataArray:
    L = values.shape[1]
    return xr.DataArray(values, dims=("cell", "latent"), name=name,
                        coords={"cell": np.asarray(cells, dtype=object),
                                "latent": np.array([f"{latent_prefix}{i}" for i in range(L)], dtype=object)})


