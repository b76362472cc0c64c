"""Device profiles: shipped files, aliases, budgets and schema validation."""

import copy

import pytest
import yaml

from spac.runtime.profile import (ProfileError, available_profiles, load_profile,
                                  profile_from_dict, save_profile)

SHIPPED = ["cpu-only", "h100-budget", "jetson-orin-agx-64gb", "jetson-orin-nano-8gb",
           "rtx4090-desktop"]
GiB = 2**30


def base() -> dict:
    return {
        "name": "test",
        "providers": [{"name": "cuda", "options": {"device_id": 0}}, {"name": "cpu"}],
        "memory": "discrete",
        "budgets": {"device": "8GiB", "host": "50%"},
        "links": {"storage_to_host_gbps": 2.0, "host_to_device_gbps": 25.0},
        "experts": {"cuda": {"a_ms": 0.05, "b_ms_per_token_per_mb": 0.0001},
                    "cpu": {"a_ms": 0.02, "b_ms_per_token_per_mb": 0.004, "ms_per_mb": 0.05}},
        "threads": 4, "draft_len": 8, "policy": "spac", "estimator": "spac-counter",
        "balancer": {"solver": "CBC", "time_limit_ms": 30},
    }


def with_change(path: str, value) -> dict:
    data = copy.deepcopy(base())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def test_every_shipped_profile_loads():
    assert available_profiles() == SHIPPED
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.has_gpu == (name != "cpu-only")
        assert profile.to_dict() == profile_from_dict(profile.to_dict()).to_dict()


def test_jetson_orin_is_the_agx_alias():
    assert load_profile("jetson-orin") == load_profile("jetson-orin-agx-64gb")
    assert load_profile("jetson-orin").memory == "unified"


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ProfileError) as err:
        load_profile("pdp-11")
    for name in SHIPPED + ["jetson-orin"]:
        assert name in str(err.value)


def test_cpu_only_profile():
    p = load_profile("cpu-only")
    assert [s.name for s in p.providers] == ["cpu"]
    assert (p.policy, p.draft_len, p.self_draft_len, p.threads) == ("spac", 4, 8, 2)
    assert p.budget_bytes("host", 10_000) == 10_000  # 100 %
    assert p.budget_bytes("device", 10_000) == 0  # no device tier


def test_budget_forms():
    p = profile_from_dict(base())
    experts, trunk = 40 * GiB, 2 * GiB
    assert p.budget_bytes("device", experts, trunk_bytes=trunk) == 6 * GiB  # trunk counted in
    assert p.budget_bytes("host", experts, trunk_bytes=trunk) == 20 * GiB  # fraction: experts
    for text, nbytes in [("512MiB", 512 * 2**20), ("2 GB", 2 * 10**9), (1234, 1234)]:
        assert profile_from_dict(with_change("budgets.device", text)).budgets["device"].nbytes \
            == nbytes
    assert profile_from_dict(with_change("budgets.host", 0.17)).budget_bytes("host", 100) == 17
    assert profile_from_dict(with_change("budgets.host", None)).budget_bytes("host", 100) is None


def test_expert_time_and_transfer():
    p = profile_from_dict(base())
    assert p.expert_time_ms("cpu", 8, 10.0) == pytest.approx(0.02 + 10 * (0.05 + 0.004 * 8))
    assert p.transfer_ms(25 * 10**6) == pytest.approx(1.0)  # 25 MB at 25 GB/s


@pytest.mark.parametrize("path, value, words", [
    ("colour", "blue", ["colour", "unknown key", "valid keys"]),
    ("links.pcie_gbps", 16, ["links.pcie_gbps", "unknown key", "host_to_device_gbps"]),
    ("threads", "four", ["threads", "expected an integer"]),
    ("draft_len", 2.5, ["draft_len", "expected an integer"]),
    ("self_draft_len", 0, ["self_draft_len", "≥"]),
    ("budgets.host", -5, ["budgets.host", "negative"]),
    ("budgets.device", "-1GiB", ["budgets.device", "negative"]),
    ("budgets.device", "lots", ["budgets.device", "8GiB", "17%"]),
    ("budgets.host", "150%", ["budgets.host", "100%"]),
    ("memory", "shared", ["memory", "discrete", "unified"]),
    ("policy", "fifo", ["policy", "spac", "lru", "static"]),
    ("balancer.solver", "gurobi", ["balancer.solver", "CBC", "HiGHS", "greedy"]),
    ("experts.cuda.a_ms", -1.0, ["experts.cuda.a_ms", "≥ 0"]),
])
def test_validation_names_file_field_and_valid_values(tmp_path, path, value, words):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_change(path, value)))
    with pytest.raises(ProfileError) as err:
        load_profile(bad)
    message = str(err.value)
    assert str(bad) in message
    for word in words:
        assert word in message


def test_missing_pieces():
    data = base()
    del data["experts"]["cuda"]
    with pytest.raises(ProfileError, match="experts.cuda"):
        profile_from_dict(data)
    data = with_change("providers", [{"name": "cpu"}])
    with pytest.raises(ProfileError, match="budgets.device"):  # no device tier without cuda
        profile_from_dict(data)


def test_too_small_budget_states_the_minimum():
    p = profile_from_dict(with_change("budgets.device", "1GiB"))
    trunk = 3 * GiB
    with pytest.raises(ProfileError) as err:
        p.validate_for_package(trunk_bytes=trunk, total_expert_bytes=40 * GiB)
    assert "budgets.device" in str(err.value)
    assert f"minimum is {trunk} bytes" in str(err.value)
    p.validate_for_package(trunk_bytes=GiB // 2, total_expert_bytes=40 * GiB)  # fits


def test_save_is_atomic_and_reloads(tmp_path):
    out = tmp_path / "mine.yaml"
    save_profile(profile_from_dict(base()), out, header="# measured\n")
    assert out.read_text().startswith("# measured\n")
    assert load_profile(out).to_dict() == profile_from_dict(base()).to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.yaml"]


# ---------------------------------------------------------------------------------------------
# spac-profile


def test_cli_list_and_show(capsys):
    from spac.runtime.profile_cli import main

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "jetson-orin-agx-64gb (alias: jetson-orin)" in listed
    assert main(["show", "jetson-orin", "--expert-bytes", "9437184",
                 "--total-expert-bytes", "58GB", "--trunk-bytes", "2GiB"]) == 0
    shown = capsys.readouterr().out
    assert "CUDAExecutionProvider" in shown and "unified" in shown
    assert "expert cache 22.00 GiB" in shown  # the 24 GiB device budget less the trunk
    assert main(["show", "nope"]) == 2


def test_calibrate_measures_and_writes_a_valid_profile(tmp_path):
    from spac.runtime.profile_cli import calibrate

    package = tmp_path / "pkg"
    package.mkdir()
    for i in range(3):
        (package / f"expert{i}.bin").write_bytes(bytes(4 * 2**20))
    mb = 10**6
    timers = {"cpu": lambda tokens: (0.5 + 0.1 * tokens) / 1000}  # seconds
    out = tmp_path / "here.yaml"
    profile = calibrate(out, package, load_profile("cpu-only"), timers, expert_bytes=5 * mb,
                        log=lambda *_: None)
    assert load_profile(out).to_dict() == profile.to_dict()
    assert profile.name == "here" and profile.links.storage_to_host_gbps > 0
    cost = profile.expert_costs["cpu"]
    assert cost.time_ms(8, 5.0) == pytest.approx(0.5 + 0.8)
    assert profile.links.host_to_device_gbps is None  # no GPU here: n/a


def test_calibrate_measures_the_package_expert_and_writes_a_valid_profile(tmp_path, exported):
    from spac.runtime.profile_cli import main

    out = tmp_path / "mine.yaml"
    assert main(["calibrate", "--package", str(exported("mixtral").output), "--out", str(out)]) == 0
    measured = load_profile(out)
    assert measured.expert_costs["cpu"] != load_profile("cpu-only").expert_costs["cpu"]
    assert measured.expert_costs["cpu"].time_ms(8, 1.0) > 0
    assert measured.links.storage_to_host_gbps > 0


def test_calibrate_refuses_a_folder_that_is_no_package(tmp_path, capsys):
    from spac.runtime.profile_cli import main

    assert main(["calibrate", "--package", str(tmp_path), "--out", str(tmp_path / "mine.yaml")]) == 2
    assert "manifest.yaml is missing" in capsys.readouterr().err
    assert not (tmp_path / "mine.yaml").exists()

# ---------------------------------------------------------------------------------------------
# A profile from a stranger: bounded values, no hang, one short error line


def assert_one_short_line(error: ProfileError) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < 400, message[:400]


@pytest.mark.parametrize("path, value, words", [
    ("threads", 100000, ["threads", "≤"]),
    ("draft_len", 10**6, ["draft_len", "≤"]),
    ("self_draft_len", 10**6, ["self_draft_len", "≤"]),
    ("links.storage_to_host_gbps", float("nan"), ["links.storage_to_host_gbps", "finite"]),
    ("links.host_to_device_gbps", float("inf"), ["links.host_to_device_gbps", "finite"]),
    ("links.host_to_device_gbps", 10**400, ["links.host_to_device_gbps", "≤"]),
    ("experts.cpu.a_ms", float("nan"), ["experts.cpu.a_ms", "finite"]),
    ("experts.cpu.ms_per_mb", 1e300, ["experts.cpu.ms_per_mb", "≤"]),
    ("balancer.time_limit_ms", float("inf"), ["balancer.time_limit_ms", "finite"]),
    ("budgets.host", float("nan"), ["budgets.host", "finite"]),
    ("budgets.device", 2**80, ["budgets.device", "≤"]),
    ("budgets.device", "9" * 400 + " TiB", ["budgets.device", "≤"]),
])
def test_numbers_are_bounded_by_what_a_machine_can_do(path, value, words):
    with pytest.raises(ProfileError) as err:
        profile_from_dict(with_change(path, value))
    assert_one_short_line(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.timeout(20)
def test_an_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(yaml.safe_dump(base()) + "\n".join(lines).replace("a9: &a9", "providers:") + "\n")
    with pytest.raises(ProfileError) as err:
        load_profile(bomb)
    assert_one_short_line(err.value)
    assert "alias" in str(err.value)


@pytest.mark.timeout(20)
def test_deep_nesting_and_big_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("providers: " + "[" * 50000 + "]" * 50000 + "\n")
    with pytest.raises(ProfileError) as err:
        load_profile(deep)
    assert_one_short_line(err.value)
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(base()) + "#" * 2**21 + "\n")
    with pytest.raises(ProfileError, match="MiB") as err:
        load_profile(big)
    assert_one_short_line(err.value)


def test_a_huge_value_is_not_echoed_whole(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_text(yaml.safe_dump(with_change("policy", "x" * 900_000)))
    with pytest.raises(ProfileError) as err:
        load_profile(huge)
    assert_one_short_line(err.value)
    assert "policy" in str(err.value) and "…" in str(err.value)


def test_a_profile_that_is_not_utf8_says_so(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(yaml.safe_dump(base()).encode() + "description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ProfileError) as err:
        load_profile(latin)
    assert_one_short_line(err.value)
    assert str(latin) in str(err.value) and "UTF-8" in str(err.value)


def test_cli_show_refuses_a_bad_profile_with_one_line(tmp_path, capsys):
    from spac.runtime.profile_cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_change("threads", 100000)))
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spac-profile: ") and "threads" in err


FUZZ_VALUES = [None, True, -1, 0, 2**70, -0.5, 1e308, float("nan"), float("inf"), "", "x" * 5000,
               "17%", "8GiB", [], [1, 2], {}, {"name": "cpu"}, {"a": {"b": {"c": None}}}]


def _leaves(node, path=()):
    """Every (path, value) in a loaded YAML document, containers included."""
    yield path, node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _leaves(child, (*path, key))


def _mutations(text: bytes, rng):
    """Seeded damage to one profile: byte flips, truncations, key deletions, type changes."""
    for _ in range(40):
        flipped = bytearray(text)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        yield bytes(flipped)
    for _ in range(15):
        yield text[:rng.randrange(len(text))]
    document = yaml.safe_load(text)
    nodes = [(path, value) for path, value in _leaves(document) if path]
    for _ in range(45):
        data = copy.deepcopy(document)
        path, _ = rng.choice(nodes)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.3:
            del parent[path[-1]]
        else:
            parent[path[-1]] = rng.choice(FUZZ_VALUES)
        yield yaml.safe_dump(data, allow_unicode=True).encode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SHIPPED)
def test_fuzzed_profiles_load_or_give_one_profile_error(name, tmp_path):
    import random

    from spac.runtime.profile import resolve_profile_path

    rng = random.Random(f"fuzz-{name}")
    text = resolve_profile_path(name).read_bytes()
    outcomes = {"valid": 0, "refused": 0}
    for i, damaged in enumerate(_mutations(text, rng)):
        path = tmp_path / f"case{i}.yaml"
        path.write_bytes(damaged)
        try:
            load_profile(path)
            outcomes["valid"] += 1
        except ProfileError as error:
            assert_one_short_line(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 40, outcomes


@pytest.mark.parametrize("arguments, fragments", [
    (["--expert-bytes", "nan"], ["argument --expert-bytes: cannot read 'nan'", "8GiB"]),
    (["--total-expert-bytes", "17%"], ["argument --total-expert-bytes: '17%' is a fraction"]),
    (["--trunk-bytes=-5GiB"], ["argument --trunk-bytes: a budget cannot be negative"]),
    (["--expert-bytes", "9" * 100_000], ["argument --expert-bytes: a budget must be ≤ 2^50 bytes", "…"]),
])
def test_cli_show_refuses_bad_sizes_with_one_line(arguments, fragments, capsys):
    from spac.runtime.profile_cli import main

    with pytest.raises(SystemExit) as exit:
        main(["show", "cpu-only", *arguments])
    assert exit.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("spac-profile show: error: "), errors
    assert len(errors[0]) < 400
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
