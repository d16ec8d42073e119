"""Places from the user's own geotagged photos: a nearest-photo index over the model's embedding.

A model of a few dozen landmarks knows almost none of the places in a photo library, but its pooled
embedding already tells photos of one place from photos of another (the Google Landmarks retrieval
winners work this way). So a photo without GPS is located where its most similar reference photo
was taken, when that similarity clears an operating point; otherwise it is refused, as the model's
own open-set decision refuses unknown landmarks.

- References: the unit-length embeddings of geotagged photos (their GPS EXIF, or a labelled
  folder's entry of a ``locations.json``), grouped into places (photos within ``place_radius_km``
  of a place's first photo), each place named by offline reverse geocoding where no table names it.
- Search: faiss, exact inner product (``IndexFlatIP``) up to ``exact_limit`` references, an IVF
  index beyond, its ``nprobe`` raised at build time until its recall against exact search reaches
  ``MIN_RECALL`` on the held-out queries (the recall is stored).
- Operating point: the lowest similarity at which held-out *references* were located with the
  target precision (a match is right when its photo lies within ``correct_km`` of the query's GPS):
  each reference queried with itself left out (a place the library has) and with its whole place
  left out (a place it does not have), never a test split.
- Versioned (``SCHEMA_VERSION``) and tied to the model by name and by the network file's digest:
  an index built with another model is refused with one message that names both.

One file (``places.npz``) written atomically: a reader never sees half an index. faiss is imported
only when an index is loaded or built, so a model used without one never loads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from landmark import atomic
from landmark.meta import ModelMeta
from landmark.open_set import threshold_for_precision, unit

SCHEMA_VERSION = 1
INDEX_FILE = "places.npz"  # the default name, and the name inside a model archive
DEFAULT_MIN_PRECISION = 0.98
CORRECT_KM = 1.0  # a located photo is right when it lands within this distance of where it was taken
PLACE_RADIUS_KM = 0.2  # photos within this distance of a place's first photo belong to it
EXACT_LIMIT = 50_000  # references searched exactly; beyond, an approximate (IVF) index
MIN_RECALL = 0.95  # of the approximate top-1 against the exact one, on the held-out queries
MAX_HELDOUT = 2_000  # held-out queries of each kind (a seeded sample beyond)
NEIGHBOURS = 3  # matched photos an answer lists
EARTH_KM = 6371.0088


class PlaceIndexError(ValueError):
    """An index file this code or this model cannot use; the message says what to do."""


@dataclass(frozen=True)
class ModelId:
    """Which network's embedding an index holds: its name and the digest of its network file."""

    name: str
    fingerprint: str

    @classmethod
    def of(cls, meta: ModelMeta) -> ModelId:
        """The FP32 network's digest (model.onnx, else model.ts), so a re-fitted open-set decision or an
        INT8 copy of the same network keeps its index, and a retrained network does not."""
        digest = meta.files.get("model.onnx") or meta.files.get("model.ts") or ""
        return cls(f"{meta.model.recipe or meta.model.arch} {meta.model_version}", digest[:16])

    def __str__(self) -> str:
        return f"{self.name!r} ({self.fingerprint})"


@dataclass(frozen=True)
class Reference:
    """One geotagged photo of the index; size + mtime tell a rerun whether to embed it again."""

    path: str  # relative to the indexed folder, POSIX
    size: int
    mtime_ns: int
    lat: float
    lon: float
    place: int = -1  # index into the places; -1 until grouped
    located_by: str = "gps"  # "gps" (its EXIF) or "locations.json" (its folder's entry)


@dataclass(frozen=True)
class Place:
    name: str
    lat: float
    lon: float
    country: str | None
    photos: int


@dataclass(frozen=True)
class OperatingPoint:
    """Where index matches are accepted, and what the held-out references showed there."""

    min_precision: float
    threshold: float | None  # cosine similarity; None: no held-out match reached the target
    correct_km: float
    queries: int  # held-out queries (left-one-out + left-place-out)
    located: int  # of them at or above the threshold
    precision: float | None  # of those located


@dataclass(frozen=True)
class Search:
    kind: str  # "exact" (IndexFlatIP) or "ivf" (IndexIVFFlat, inner product)
    nlist: int = 0
    nprobe: int = 0
    recall: float | None = None  # top-1 of the approximate search = the exact one, on held-out queries


@dataclass(frozen=True)
class IndexMeta:
    model: ModelId
    source: str  # the folder that was indexed
    built_at: str
    dim: int
    place_radius_km: float
    search: Search
    operating_point: OperatingPoint
    places: tuple[Place, ...]
    references: tuple[Reference, ...]
    complete: bool = True  # False: the state an interrupted build resumes from, not an index
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IndexMeta:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlaceIndexError(f"place index schema_version {version!r}; this code reads {SCHEMA_VERSION}: "
                                  "rebuild it with `make index`")
        return cls(ModelId(**d["model"]), d["source"], d["built_at"], int(d["dim"]), float(d["place_radius_km"]),
                   Search(**d["search"]), OperatingPoint(**d["operating_point"]),
                   tuple(Place(**p) for p in d["places"]), tuple(Reference(**r) for r in d["references"]),
                   bool(d.get("complete", True)), version)


@dataclass(frozen=True)
class PlaceMatch:
    """One photo against the index: its nearest reference's place, and whether that counts."""

    place: Place
    similarity: float  # cosine similarity to the nearest reference photo
    confidence: float  # precision of the held-out matches at least this similar
    located: bool
    threshold: float | None
    min_precision: float
    photos: tuple[tuple[str, float], ...]  # the most similar reference photos: (path, similarity)

    def to_dict(self) -> dict:
        return {"name": self.place.name, "lat": self.place.lat, "lon": self.place.lon, "country": self.place.country,
                "similarity": round(self.similarity, 6), "confidence": round(self.confidence, 6),
                "located": self.located,
                "operating_point": {"min_precision": self.min_precision,
                                    "threshold": None if self.threshold is None else round(self.threshold, 6)},
                "photos": [{"path": p, "similarity": round(s, 6)} for p, s in self.photos]}


def haversine_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle distance between (lat, lon) rows of ``a`` and ``b`` (broadcast), in km."""
    a, b = np.radians(np.asarray(a, np.float64)), np.radians(np.asarray(b, np.float64))
    dlat, dlon = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    h = np.sin(dlat / 2) ** 2 + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


def group_places(coords: np.ndarray, radius_km: float) -> tuple[np.ndarray, np.ndarray]:
    """(place of each photo, place centres): a photo joins the nearest place whose first photo lies within
    ``radius_km``, else starts one. Leader clustering in the given order: deterministic, no chaining (a
    street of photos does not become one place)."""
    # candidates from a grid of radius-sized cells (equirectangular km), so a library of a million photos
    # compares each photo with the few leaders around it, not with every place
    cell = np.floor(np.stack([coords[:, 0] * 111.2, coords[:, 1] * 111.2 * np.cos(np.radians(coords[:, 0]))],
                             axis=1) / radius_km).astype(np.int64)
    grid: dict[tuple[int, int], list[int]] = {}
    leaders: list[int] = []
    labels = np.empty(len(coords), np.int64)
    for i, (cy, cx) in enumerate(cell):
        near = [j for dy in (-1, 0, 1) for dx in (-1, 0, 1) for j in grid.get((cy + dy, cx + dx), ())]
        if near:
            d = haversine_km(coords[[leaders[j] for j in near]], coords[i])
            k = int(d.argmin())
            if d[k] <= radius_km:
                labels[i] = near[k]
                continue
        labels[i] = len(leaders)
        grid.setdefault((int(cy), int(cx)), []).append(len(leaders))
        leaders.append(i)
    return labels, centres_of(coords, labels)


def centres_of(coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean position of each place's photos (places are small: the plain mean of degrees is fine)."""
    n = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=n)[:, None]
    sums = np.stack([np.bincount(labels, coords[:, k], minlength=n) for k in (0, 1)], axis=1)
    return sums / np.maximum(counts, 1)


def place_names(coords: np.ndarray) -> list[tuple[str, str | None]]:
    """(nearest town, country) of each (lat, lon) from the offline GeoNames table of ``reverse_geocode``."""
    if not len(coords):
        return []
    import reverse_geocode

    found = reverse_geocode.search([tuple(map(float, c)) for c in coords])
    return [(f.get("city") or f"{c[0]:.4f}, {c[1]:.4f}", f.get("country")) for f, c in zip(found, coords, strict=True)]


def heldout_queries(vectors: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Which references are queried (all, or a seeded sample of MAX_HELDOUT)."""
    n = len(vectors)
    if n <= MAX_HELDOUT:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_HELDOUT, replace=False))


def heldout_matches(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray,
                    chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact nearest reference of each query with itself left out (sim, id) and with its whole place left out
    (sim, id; -1 where no other place exists)."""
    q = vectors[queries]
    best = np.full((2, len(queries)), -np.inf, np.float32)
    ids = np.full((2, len(queries)), -1, np.int64)
    for start in range(0, len(vectors), chunk):
        sims = q @ vectors[start:start + chunk].T
        cols = np.arange(start, start + sims.shape[1])
        for kind, mask in enumerate((queries[:, None] == cols[None, :],
                                     labels[queries][:, None] == labels[cols][None, :])):
            masked = np.where(mask, -np.inf, sims)
            j = masked.argmax(axis=1)
            s = masked[np.arange(len(queries)), j]
            better = s > best[kind]
            best[kind, better], ids[kind, better] = s[better], cols[j[better]]
    return best[0], ids[0], best[1], ids[1]


def heldout_scores(vectors: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                   correct_km: float) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, right) of every held-out query of both kinds: a query is right when its nearest other
    reference lies within ``correct_km`` of it."""
    queries = heldout_queries(vectors, labels)
    loo_s, loo_j, lpo_s, lpo_j = heldout_matches(vectors, labels, queries)
    scores, correct = [], []
    for s, j in ((loo_s, loo_j), (lpo_s, lpo_j)):
        ok = j >= 0
        scores.append(s[ok].astype(np.float64))
        correct.append(haversine_km(coords[queries[ok]], coords[j[ok]]) <= correct_km)
    return np.concatenate(scores), np.concatenate(correct)


def operating_point(scores: np.ndarray, correct: np.ndarray, min_precision: float, correct_km: float) -> OperatingPoint:
    t = threshold_for_precision(scores, correct, min_precision) if len(scores) else math.inf
    hit = scores >= t
    return OperatingPoint(min_precision, None if math.isinf(t) else float(t), correct_km, len(scores),
                          int(hit.sum()), float(correct[hit].mean()) if hit.any() else None)


def _faiss(threads: int = 0):
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    return faiss


def build_search(vectors: np.ndarray, exact_limit: int = EXACT_LIMIT, threads: int = 0):
    """An exact IndexFlatIP, or an IVF index (trained on a sample) where there are more than ``exact_limit``
    references; returns (faiss index, Search)."""
    faiss = _faiss(threads)
    n, d = vectors.shape
    if n <= exact_limit:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, Search("exact")
    nlist = int(min(max(16, math.sqrt(n)), n // 39))  # sqrt(n) lists: training stays minutes at 1M
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)]
    index.train(sample)
    index.add(vectors)
    return index, Search("ivf", nlist)


def tune_nprobe(index, vectors: np.ndarray, queries: np.ndarray, exclude: np.ndarray | None = None,
                min_recall: float = MIN_RECALL) -> Search:
    """The smallest power-of-two nprobe whose top-1 agrees with exact search over ``vectors`` on ``queries`` at
    ``min_recall``; ``exclude``: each query's own reference id (a reference left out of its own search)."""
    k = 1 if exclude is None else 2
    flat = _faiss().IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    exact = _top1(*flat.search(queries, k), exclude)
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        recall = float((_top1(*index.search(queries, k), exclude) == exact).mean())
        if recall >= min_recall or nprobe >= index.nlist:
            return Search("ivf", index.nlist, nprobe, recall)
        nprobe *= 2


def _top1(sims: np.ndarray, ids: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """The best id of each row, skipping the row's own id where ``exclude`` gives it."""
    if exclude is None:
        return ids[:, 0]
    return np.where(ids[:, 0] == exclude, ids[:, 1], ids[:, 0])


class PlaceIndex:
    """A loaded (or freshly built) index: its record, its reference vectors, its held-out evidence."""

    def __init__(self, meta: IndexMeta, vectors: np.ndarray, scores: np.ndarray, correct: np.ndarray,
                 search=None, threads: int = 0) -> None:
        self.meta, self.vectors, self.scores, self.correct = meta, vectors, scores, correct
        self.threads = threads
        self._search = search
        order = np.argsort(-scores, kind="stable")
        self._sorted = scores[order]
        self._precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1) if len(order) else np.ones(0)

    @property
    def search_index(self):
        if self._search is None:  # exact: rebuilt from the vectors (faster than storing it twice)
            self._search, _ = build_search(self.vectors, exact_limit=len(self.vectors), threads=self.threads)
        return self._search

    def threshold(self, min_precision: float | None = None) -> float | None:
        op = self.meta.operating_point
        if min_precision is None or min_precision == op.min_precision:
            return op.threshold
        t = threshold_for_precision(self.scores, self.correct, min_precision) if len(self.scores) else math.inf
        return None if math.isinf(t) else float(t)

    def confidence(self, similarity: float) -> float:
        """Precision of the held-out matches at least this similar (of the most similar one, above them all)."""
        if not len(self._sorted):
            return 0.0
        at_least = int(np.searchsorted(-self._sorted, -similarity, side="right"))
        return float(self._precision[max(at_least, 1) - 1])

    def match(self, embedding: np.ndarray, min_precision: float | None = None) -> list[PlaceMatch]:
        """Every row of a batch of embeddings against the index."""
        target = self.meta.operating_point.min_precision if min_precision is None else min_precision
        threshold = self.threshold(min_precision)
        q = np.ascontiguousarray(unit(np.asarray(embedding, np.float32)), dtype=np.float32)
        sims, ids = self.search_index.search(q, min(NEIGHBOURS, len(self.vectors)))
        refs, places = self.meta.references, self.meta.places
        out = []
        for s, j in zip(sims, ids, strict=True):
            keep = j >= 0
            s, j = s[keep], j[keep]
            best = float(s[0])
            out.append(PlaceMatch(places[refs[j[0]].place], best, self.confidence(best),
                                  threshold is not None and best >= threshold, threshold, target,
                                  tuple((refs[int(r)].path, float(v)) for r, v in zip(j, s, strict=True))))
        return out

    def save(self, path: Path) -> None:
        arrays = {"meta": np.frombuffer(json.dumps(self.meta.to_dict()).encode("utf-8"), np.uint8),
                  "vectors": self.vectors, "heldout_scores": self.scores, "heldout_correct": self.correct}
        if self.meta.search.kind != "exact" and self._search is not None:
            arrays["faiss"] = _faiss().serialize_index(self._search)
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path, model: ModelId | None = None, threads: int = 0, partial: bool = False) -> PlaceIndex:
        """Read ``path``; with ``model``, refuse an index built with any other network."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"place index {path} not found: build it with `make index`")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = IndexMeta.from_dict(json.loads(z["meta"].tobytes().decode("utf-8")))
                vectors = np.ascontiguousarray(z["vectors"], dtype=np.float32)
                scores, correct = z["heldout_scores"], z["heldout_correct"].astype(bool)
                blob = z["faiss"] if "faiss" in z.files else None
        except PlaceIndexError as e:
            raise PlaceIndexError(f"{path}: {e}") from None
        except (OSError, ValueError, KeyError) as e:
            raise PlaceIndexError(f"{path} is not a place index ({e.__class__.__name__}: {e})") from None
        if model is not None and meta.model != model:
            raise PlaceIndexError(f"{path} was built with model {meta.model}, not with this model {model}: "
                                  "rebuild it with `make index MODEL_DIR=<this model>`")
        if not meta.complete and not partial:
            raise PlaceIndexError(f"{path} is an interrupted build: rerun `make index` to finish it")
        search = _faiss(threads).deserialize_index(blob) if blob is not None else None
        if search is not None:
            search.nprobe = meta.search.nprobe
        return cls(meta, vectors, scores, correct, search, threads)


def build(model: ModelId, source: str, built_at: str, references: Sequence[Reference], vectors: np.ndarray,
          names: dict[int, tuple[str, str | None]] | None = None, min_precision: float = DEFAULT_MIN_PRECISION,
          place_radius_km: float = PLACE_RADIUS_KM, correct_km: float = CORRECT_KM,
          exact_limit: int = EXACT_LIMIT, threads: int = 0,
          groups: Sequence[str | None] | None = None) -> PlaceIndex:
    """References + their unit vectors -> a complete index: places, held-out operating point, search.

    ``groups``: a label per reference (a labelled folder) that makes it a place of its own, or None to
    group it by GPS; ``names``: place names known for a group's first reference (e.g. ``locations.json``)."""
    if not len(references):
        raise PlaceIndexError("no photo with a location to index: photos need GPS EXIF, or a locations.json entry "
                              "for their folder")
    vectors = np.ascontiguousarray(unit(np.asarray(vectors, np.float32)), dtype=np.float32)
    coords = np.array([[r.lat, r.lon] for r in references], np.float64)
    labels, centres = _places(coords, groups, place_radius_km)
    names = names or {}
    places = []
    counts = np.bincount(labels, minlength=len(centres))
    firsts = np.full(len(centres), len(labels))
    np.minimum.at(firsts, labels, np.arange(len(labels)))
    unnamed = [j for j in range(len(centres)) if int(firsts[j]) not in names]
    geocoded = dict(zip(unnamed, place_names(centres[unnamed]), strict=True))
    for j, (lat, lon) in enumerate(centres):
        name, country = names.get(int(firsts[j])) or geocoded[j]
        places.append(Place(name, round(float(lat), 6), round(float(lon), 6), country, int(counts[j])))
    refs = tuple(replace(r, place=int(p)) for r, p in zip(references, labels, strict=True))
    scores, correct = heldout_scores(vectors, coords, labels, correct_km)
    op = operating_point(scores, correct, min_precision, correct_km)
    search, info = build_search(vectors, exact_limit, threads)
    if info.kind == "ivf":
        queries = heldout_queries(vectors, labels)
        info = tune_nprobe(search, vectors, vectors[queries], queries)
    meta = IndexMeta(model, source, built_at, int(vectors.shape[1]), place_radius_km, info, op, tuple(places), refs)
    return PlaceIndex(meta, vectors, scores, correct, search, threads)


def _places(coords: np.ndarray, groups: Sequence[str | None] | None, radius_km: float) -> tuple[np.ndarray, np.ndarray]:
    """Labelled references form one place per label; the others are grouped by GPS."""
    if groups is None or all(g is None for g in groups):
        return group_places(coords, radius_km)
    keys: dict[str, int] = {}
    labels = np.empty(len(coords), np.int64)
    gps = [i for i, g in enumerate(groups) if g is None]
    for i, g in enumerate(groups):
        if g is not None:
            labels[i] = keys.setdefault(g, len(keys))
    if gps:
        sub, _ = group_places(coords[gps], radius_km)
        labels[gps] = sub + len(keys)
    return labels, centres_of(coords, labels)


def partial(model: ModelId, source: str, built_at: str, references: Sequence[Reference],
            vectors: np.ndarray) -> PlaceIndex:
    """The state of an interrupted build: the photos embedded so far, no places, no operating point."""
    vectors = np.asarray(vectors, np.float32).reshape(len(references), -1)
    meta = IndexMeta(model, source, built_at, int(vectors.shape[1]) if len(references) else 0, 0.0, Search("exact"),
                     OperatingPoint(0.0, None, 0.0, 0, 0, None), (), tuple(references), complete=False)
    return PlaceIndex(meta, vectors, np.zeros(0), np.zeros(0, bool))
