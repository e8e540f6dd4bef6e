"""VideoDataModule end to end on real encoded videos: batches, samplers, bad input, setup validation."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

from adafocus.data import BadVideosError, ClipCollate, ListFileError, VideoDataModule, VideoReadError

T, S = 4, 32
MULTI = [("a/v0", 12, [0]), ("a/v1", 14, [1, 3]), ("b/v 2", 12, [2]), ("b/v3", 6, [0, 1, 2]), ("v4", 16, [3])]
MULTI_VAL = [("a/v0", 12, [0]), ("b/v 2", 12, [2, 1]), ("v4", 16, [3])]
GOOD = [(f"good{i}", 12, [i % 2]) for i in range(6)]
BAD = [("bad_garbage", 12, [0]), ("bad_empty", 12, [1])]


def make_dm(root, **kwargs) -> VideoDataModule:
    args = dict(
        data_dir=root, list_format="comma", train_list="train_split.txt", val_list="val_split.txt",
        class_index="classInd.txt", num_classes=4, multilabel=True, num_frames=T, input_size=S, batch_size=2,
        workers=0, decode_short_side=S, seed=0,
    )  # fmt: skip
    args.update(kwargs)
    return VideoDataModule(**args)


@pytest.fixture(scope="module")
def multi_root(video_dataset_factory):
    return video_dataset_factory("multi", MULTI, 4, val_videos=MULTI_VAL)


@pytest.fixture(scope="module")
def bad_root(video_dataset_factory):
    root = video_dataset_factory("bad", GOOD + BAD, 2, val_videos=GOOD[:3] + BAD[:1])
    (root / "videos" / "bad_garbage.mp4").write_bytes(b"\x00\x01garbage" * 100)
    (root / "videos" / "bad_empty.mp4").write_bytes(b"")
    return root


def check_batch(batch, batch_size, max_labels):
    assert set(batch) == {"video", "label", "labels", "index", "path"}
    assert batch["video"].shape == (batch_size, T, 3, S, S) and batch["video"].dtype == torch.uint8
    assert batch["label"].shape == (batch_size,) and batch["label"].dtype == torch.long
    assert batch["labels"].shape == (batch_size, max_labels) and batch["labels"].dtype == torch.long
    assert batch["index"].shape == (batch_size,)
    assert isinstance(batch["path"], list) and all(isinstance(p, str) for p in batch["path"])
    for label, labels in zip(batch["label"], batch["labels"], strict=True):
        assert label in labels[labels >= 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_through_datamodule(multi_root, workers):
    dm = make_dm(multi_root, workers=workers, batch_size=2)
    dm.setup("fit")
    assert dm.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert dm.per_device_batch_size == 2 and dm.max_labels == 3
    epochs = []
    for _epoch in range(2 if workers else 1):  # persistent workers: a second epoch reuses them
        seen = []
        for batch in dm.train_dataloader():
            check_batch(batch, 2, 3)  # drop_last (as the original): 5 videos -> 2 full batches
            seen += batch["path"]
        assert len(seen) == 4 and len(set(seen)) == 4 and set(seen) <= {v[0] for v in MULTI}
        epochs.append(seen)
    val = list(dm.val_dataloader())
    assert [p for b in val for p in b["path"]] == [v[0] for v in MULTI_VAL]  # sequential, not shuffled
    labels = torch.cat([b["labels"] for b in val])
    assert labels.tolist() == [[0, -1, -1], [2, 1, -1], [3, -1, -1]]  # -1 padded to L = 3 (over the dataset)
    assert torch.cat([b["label"] for b in val]).tolist() == [0, 2, 3]  # eval: the first label


def test_label_drawn_at_each_load(multi_root):
    dm = make_dm(multi_root)
    dm.setup("fit")
    index = [e.path for e in dm.train_dataset.entries].index("b/v3")
    drawn = {int(dm.train_dataset[index]["label"]) for _ in range(30)}
    assert drawn == {0, 1, 2}
    assert dm.train_dataset[index]["labels"].tolist() == [0, 1, 2]


def test_eval_dataloader_limit_is_seeded(multi_root):
    dm = make_dm(multi_root, batch_size=4)
    paths = [[p for b in dm.eval_dataloader("train", limit=3, seed=s) for p in b["path"]] for s in (0, 0, 1)]
    assert paths[0] == paths[1] and len(paths[0]) == 3
    order = [v[0] for v in MULTI]
    assert paths[0] == sorted(paths[0], key=order.index)  # list order kept
    assert len([p for b in dm.eval_dataloader("val") for p in b["path"]]) == 3


def test_minik_space_format_with_spaces(video_dataset_factory):
    videos = [("air drumming/clip one", 10, [0]), ("zumba/clip two", 12, [1])]
    names = dict(
        train_list="mini_train_videofolder.txt",
        val_list="mini_val_videofolder.txt",
        class_index="minik_classInd.txt",
    )
    root = video_dataset_factory("minik", videos, 2, list_format="space", **names)
    dm = make_dm(root, list_format="space", num_classes=2, multilabel=False, **names)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    check_batch(batch, 2, 1)
    assert batch["path"] == ["air drumming/clip one", "zumba/clip two"] and batch["label"].tolist() == [0, 1]


def ddp_trainer(devices=2):
    return pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp", logger=False, use_distributed_sampler=False
    )


def test_distributed_batch_size_and_samplers(multi_root):
    dm = make_dm(multi_root, batch_size=4)
    dm.trainer = ddp_trainer()  # world size 2, rank 0 — no process group needed to build the samplers
    dm.setup("fit")
    assert dm.per_device_batch_size == 2
    train, val = dm.train_dataloader(), dm.val_dataloader()
    shards = train.sampler.sampler  # inside the resumable loader's wrapper
    assert isinstance(shards, DistributedSampler) and shards.num_replicas == 2
    assert isinstance(val.sampler, UnrepeatedDistributedSampler) and val.batch_size == 2

    odd = dm.train_dataset  # 5 videos
    val_parts = [
        list(UnrepeatedDistributedSampler(odd, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)
    ]
    assert sorted(val_parts[0] + val_parts[1]) == list(range(5))  # none twice, none dropped
    train_parts = [
        list(DistributedSampler(odd, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)
    ]
    assert len(train_parts[0]) == len(train_parts[1]) == 3 and set(train_parts[0] + train_parts[1]) == set(
        range(5)
    )

    bad = make_dm(multi_root, batch_size=3)
    bad.trainer = ddp_trainer()
    with pytest.raises(ValueError, match="batch_size=3 is the total over all devices .* world size 2"):
        bad.setup("fit")


def test_bad_training_videos_substituted_and_counted(bad_root):
    dm = make_dm(bad_root, num_classes=2, workers=2, batch_size=4, max_bad_fraction=0.5)
    dm.setup("fit")
    paths = []
    for batch in dm.train_dataloader():
        assert batch["video"].shape[0] == len(batch["path"])
        paths += batch["path"]
        dm.check_bad_videos()  # 2 of 8 <= 50 %
    assert len(paths) == 8 and not any(p.startswith("bad") for p in paths)  # every bad one replaced
    expected = sorted(str(bad_root / "videos" / name) for name, *_ in BAD)
    assert sorted(dm.bad_videos) == expected  # marks made in the worker processes
    dm.max_bad_fraction = 0.2
    with pytest.raises(BadVideosError, match="2 of the 8 training videos") as info:
        dm.check_bad_videos()
    assert all(p in str(info.value) for p in expected)


def test_bad_video_reported_once_with_decoder_message(bad_root, caplog):
    dm = make_dm(bad_root, num_classes=2, max_bad_fraction=1.0)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="adafocus.data"):
        for _ in range(2):
            for _batch in dm.train_dataloader():
                pass
    messages = [r.getMessage() for r in caplog.records if "bad video" in r.getMessage()]
    assert len(messages) == 2  # once per bad video over two epochs
    garbage = [m for m in messages if "bad_garbage" in m]
    assert len(garbage) == 1 and "Invalid data" in garbage[0]
    assert any("bad_empty" in m and "empty file" in m for m in messages)


class Probe(pl.LightningModule):
    """The smallest real LightningModule that consumes the batches."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(
            self.layer(batch["video"].mean(dim=(1, 3, 4))), batch["label"]
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_too_many_bad_videos_stop_training(bad_root):
    dm = make_dm(bad_root, num_classes=2, batch_size=2, max_bad_fraction=0.1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    with pytest.raises(BadVideosError, match="max_bad_fraction=0.1"):
        trainer.fit(Probe(), datamodule=dm)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_eval_video_raises_naming_path(bad_root, workers):
    dm = make_dm(bad_root, num_classes=2, workers=workers, batch_size=2)
    dm.setup("validate")
    with pytest.raises(Exception, match="bad_garbage") as info:
        list(dm.val_dataloader())
    assert isinstance(info.value, VideoReadError if workers == 0 else Exception)
    # the traceback holds the loader's worker processes: free them now, not in a later cyclic garbage
    # collection (PyTorch then waits 5 s per worker for a shutdown message its closed queues never send)
    del info


def test_bad_eval_video_skipped_on_request(bad_root):
    dm = make_dm(bad_root, num_classes=2, batch_size=2, skip_bad_eval=True)
    dm.setup("validate")
    paths = [p for b in dm.val_dataloader() for p in b["path"]]
    assert paths == ["good0", "good1", "good2"]
    assert dm.skipped_videos("val") == [str(bad_root / "videos" / "bad_garbage")]
    empty = ClipCollate(T, S, 1)([None, None])
    assert empty["video"].shape == (0, T, 3, S, S) and empty["path"] == []


def test_setup_validates_lists(tmp_path, multi_root):
    for name in ("train_split.txt", "val_split.txt", "classInd.txt"):
        (tmp_path / name).write_text((multi_root / name).read_text())
    with (tmp_path / "train_split.txt").open("a") as f:
        f.write("broken line\n")
    with pytest.raises(ListFileError, match=r"train_split.txt:6: malformed"):
        make_dm(tmp_path).setup("fit")
    with pytest.raises(ListFileError, match=r"train_split.txt:2: 2 labels .* single-label"):
        make_dm(multi_root, multilabel=False).setup("fit")
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    with pytest.raises(ListFileError, match=r"val_split.txt:3: label\(s\) \[3\] outside \[0, 3\)"):
        make_dm(tmp_path, num_classes=3, class_index="three.txt").setup("validate")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.txt")):
        make_dm(tmp_path, class_index="nope.txt").setup("fit")
    with pytest.raises(FileNotFoundError, match=str(multi_root / "missing_val.txt")):
        make_dm(multi_root, val_list="missing_val.txt").setup("validate")
