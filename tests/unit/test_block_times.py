"""nodes/_block_times: block compute times kept across server starts, never trusted when damaged."""
import json
import logging

from harness.pure_nodes import pure_node

T = pure_node("_block_times")


def test_times_round_trip_per_model_gpu_and_shape(tmp_path):
    store = T.BlockTimes(tmp_path / "sub" / "block_times.json")
    key = T.times_key("flux", [100, 200], "NVIDIA H200", (1, 16, 128, 128))
    assert store.get(key) is None
    store.put(key, [0.004, 0.0017])
    assert T.BlockTimes(tmp_path / "sub" / "block_times.json").get(key) == [0.004, 0.0017]   # a new process
    others = [T.times_key("flux", [100, 201], "NVIDIA H200", (1, 16, 128, 128)),   # another model
              T.times_key("flux", [100, 200], "NVIDIA H100", (1, 16, 128, 128)),   # another GPU
              T.times_key("flux", [100, 200], "NVIDIA H200", (2, 16, 128, 128))]   # another shape
    assert len(set(others) | {key}) == 4 and all(store.get(k) is None for k in others)


def test_a_damaged_or_foreign_file_is_ignored_and_replaced(tmp_path, caplog):
    path = tmp_path / "block_times.json"
    path.write_text("{not json")
    store = T.BlockTimes(path)
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        assert store.get("k") is None
    assert "ignoring the block-time file" in caplog.text
    store.put("k", [0.1])
    assert json.loads(path.read_text()) == {"version": T.FILE_VERSION, "times": {"k": [0.1]}}
    path.write_text(json.dumps({"version": T.FILE_VERSION, "times": {"k": [-1.0], "j": "x"}}))
    assert store.get("k") is None and store.get("j") is None   # nonsense values are not plans


def test_oldest_entries_go_first_and_no_path_means_no_file(tmp_path):
    store = T.BlockTimes(tmp_path / "t.json")
    for i in range(T.MAX_ENTRIES + 3):
        store.put(f"k{i}", [0.001])
    times = json.loads((tmp_path / "t.json").read_text())["times"]
    assert len(times) == T.MAX_ENTRIES and "k0" not in times and f"k{T.MAX_ENTRIES + 2}" in times
    none = T.BlockTimes(None)
    none.put("k", [0.1])
    assert none.get("k") is None


def test_a_folder_that_cannot_be_written_only_warns(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    store = T.BlockTimes(blocked / "block_times.json")   # its folder is a file
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        store.put("k", [0.1])
    assert "could not save block times" in caplog.text and store.get("k") is None


def test_activation_bytes_travel_with_the_times_and_an_older_file_has_none(tmp_path):
    path = tmp_path / "block_times.json"
    path.write_text(json.dumps({"version": T.FILE_VERSION, "times": {"k": [0.1]}}))   # written before they existed
    store = T.BlockTimes(path)
    assert store.get("k") == [0.1] and store.get_activation("k") is None
    store.put("j", [0.2], activation_bytes=123_456_789)
    assert T.BlockTimes(path).get_activation("j") == 123_456_789 and store.get("k") == [0.1]
    store.put("j", [0.3])   # timed again without a memory reading: the old reading does not linger
    assert store.get_activation("j") is None
    path.write_text(json.dumps({"version": T.FILE_VERSION, "times": {"j": [0.1]}, "activation_bytes": {"j": -5}}))
    assert store.get_activation("j") is None   # nonsense is not a plan
