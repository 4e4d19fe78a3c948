"""The Hugging Face source (kind hf; see data/sources.py): a `datasets` dataset, loaded from
the hub (the local cache serves it offline), a local dataset folder or a `save_to_disk` folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .file_sources import ROWS_PER_BATCH
from .pieces import Source, doc_pieces
from .sampling import DataError

__all__ = ["HFDataset", "HFSource", "load_hf"]


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face `datasets` dataset (Config's dataset_name, dataset_config, dataset_split,
    dataset_text_field and streaming). `name`: a hub id (the local cache serves it offline), a
    local dataset folder (data files that `load_dataset` reads) or a `save_to_disk` folder."""

    name: str
    config: str = ""
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> HFDataset:
        if not (name or config.dataset_name):
            raise DataError("dataset_name: dataset_source is hf but no dataset is named; set dataset_name "
                            "(a hub id or a local dataset folder)")
        return cls(name or config.dataset_name, config.dataset_config, config.dataset_split,
                   config.dataset_text_field, config.streaming)


class HFSource(Source):
    kind = "hf"

    def __init__(self, hf: HFDataset, piece_bytes: int):
        self.hf, self.piece_bytes = hf, piece_bytes
        self.spec, self.text_field = hf.name, hf.text_field
        self.ds = load_hf(hf)
        info = getattr(self.ds, "info", None)
        self.size = getattr(info, "dataset_size", None) or None
        fingerprint = getattr(self.ds, "_fingerprint", None)  # a Dataset's content hash
        if fingerprint is None:  # a stream has none: its builder, version and sizes stand in
            fingerprint = json.dumps([getattr(info, k, None) and str(getattr(info, k)) for k in
                                      ("builder_name", "config_name", "version", "dataset_size", "splits")])
        self.stat = [hf.name, hf.config, hf.split, hf.text_field, hf.streaming, fingerprint]
        self.identity = json.dumps(self.stat)
        names = getattr(self.ds, "column_names", None)
        if names is not None and hf.text_field not in names:
            raise DataError(f"dataset_text_field: the dataset {hf.name!r} ({hf.split}) has no field "
                            f"{hf.text_field!r} (fields: {', '.join(names)}); set dataset_text_field "
                            "(--text_field) to its text field")

    def pieces(self, start=None, hasher=None):
        if hasher is not None:
            hasher.update(self.identity.encode())
        row = start[0] if start else 0
        field = self.hf.text_field
        ds = self.ds.select_columns([field]) if field in (self.ds.column_names or ()) else self.ds
        ds = ds.skip(row) if row else ds
        for batch in ds.iter(batch_size=ROWS_PER_BATCH):
            if field not in batch:
                raise DataError(f"dataset_text_field: the dataset {self.hf.name!r} has no field {field!r} "
                                f"(fields: {', '.join(batch)}); set dataset_text_field (--text_field)")
            for text in batch[field]:
                row += 1
                if not text:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"dataset_text_field: row {row} of {self.hf.name!r} holds "
                                    f"{type(text).__name__} in {field!r}, not text; name a text field")
                yield from doc_pieces(text, (row,), self.piece_bytes)


def load_hf(hf: HFDataset) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("dataset_source: hf needs the `datasets` package; install it with "
                        "pip install 'dantinox-eqx[hf-data]'") from None
    try:
        folder = Path(hf.name).expanduser()
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():  # save_to_disk
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[hf.split]
            return ds.to_iterable_dataset() if hf.streaming else ds
        return datasets.load_dataset(hf.name, hf.config or None, split=hf.split, streaming=hf.streaming)
    except KeyError:
        raise DataError(f"dataset_split: the dataset {hf.name!r} has no split {hf.split!r}; set "
                        "dataset_split") from None
    except Exception as e:  # datasets raises many types (hub, offline, builder errors): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset_name: cannot load the Hugging Face dataset {hf.name!r} (config "
                        f"{hf.config or 'default'!r}, split {hf.split!r}): {first}; check the name, or "
                        "download it once while online (the local cache then serves it offline)") from None
