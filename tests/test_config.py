import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_shipped_config_is_valid():
    s = load_settings(REPO / "config.toml")
    assert s.source.endswith("config.toml")
    assert s.worker.batch_size >= 1


def test_watch_defaults_and_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = load_settings(write(tmp_path, '[[watch]]\npath = "~/pics"\n'))
    w = s.watch[0]
    assert w.path == tmp_path / "pics"
    assert w.name == "pics"
    assert w.generators == ["wd_tagger"]
    assert w.existing_caption == "skip"
    # one generator: .txt, what trainers read; several: their caption types
    assert w.extension_for("wd_tagger", "tags") == "txt"
    assert w.extension_for("vlm", "caption") == "caption"  # not this folder's generator
    assert w.settle_seconds == 2.0
    assert "webp" in w.image_extensions


def test_env_overrides_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIOND_WORKER__BATCH_SIZE", "3")
    s = load_settings(write(tmp_path, "[worker]\nbatch_size = 16\n"))
    assert s.worker.batch_size == 3


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    xdg = tmp_path / "xdg"
    (xdg / "captiond").mkdir(parents=True)
    (xdg / "captiond" / "config.toml").write_text("log_level = 'debug'\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("CAPTIOND_CONFIG", raising=False)
    assert load_settings().log_level == "debug"
    (tmp_path / "config.toml").write_text("log_level = 'error'\n")
    assert load_settings().log_level == "error"  # ./config.toml beats XDG
    env_cfg = tmp_path / "env.toml"
    env_cfg.write_text("log_level = 'warning'\n")
    monkeypatch.setenv("CAPTIOND_CONFIG", str(env_cfg))
    assert load_settings().log_level == "warning"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[worker]\nbatch_size = 0\n", "worker.batch_size: Input should be greater than or equal"),
        ("[[watch]]\nrecursive = true\n", "watch[0].path: Field required"),
        ("[[watch]]\npath = '/x'\nexisting_caption = 'clobber'\n", "watch[0].existing_caption"),
        ("[[watch]]\npath = '/x'\ngenerators = ['no']\n", "watch[0].generators: unknown gen"),
        ("bogus_key = 1\n", "bogus_key: Extra inputs are not permitted"),
        ("[postprocess]\nsteps = ['shout']\n", "unknown steps ['shout']"),
        ("[generators.wd_tagger]\ngeneral_threshold = 'x'\n", "wd_tagger.general_threshold"),
        ("[generators.nope]\nx = 1\n", "generators.nope: unknown generator"),
        ("[[watch]]\npath = '/a/x'\n[[watch]]\npath = '/b/x'\n", "watch names must be unique"),
        ("[worker\n", "not valid TOML"),
        ("[[watch]]\npath = '/x'\nsidecar_extension = 'png'\n", "is an image extension"),
        ("[[watch]]\npath = '/x'\nsidecar_extension = '../x'\n", "letters, digits"),
        ("[[watch]]\npath = '/x'\n[[watch]]\npath = '/x/sub'\n", "may not overlap"),
        ("socket_mode = 660\n", "socket_mode: write the mode in octal"),
        (
            "[worker]\nstall_seconds = 60\nread_timeout_seconds = 90\n",
            "read_timeout_seconds (90) must be below stall_seconds (60)",
        ),
    ],
)
def test_invalid_config_messages(tmp_path, text, expected):
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    message = str(err.value)
    assert message.startswith(str(cfg) + ":")
    assert expected in message


def test_same_extension_for_two_generators_is_rejected(tmp_path, monkeypatch):
    from daemon.generators import registry

    monkeypatch.setitem(registry.BUILTINS, "echo", "tests.fakegen:EchoGenerator")
    cfg = write(
        tmp_path,
        "[[watch]]\npath = '/x'\ngenerators = ['wd_tagger', 'echo']\nsidecar_extension = 'txt'\n",
    )
    with pytest.raises(ConfigError, match="same sidecar extension"):
        load_settings(cfg)


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    cfg = write(tmp_path, "[worker]\nbatch_size = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "worker.batch_size" in proc.stderr
    assert str(cfg) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_config_file_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(tmp_path / "nope.toml"), "check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr


def test_socket_mode_from_environment_is_octal(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIOND_SOCKET_MODE", "0660")
    assert load_settings(write(tmp_path, "")).socket_mode == 0o660


def test_environment_errors_name_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIOND_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match=r"CAPTIOND_\* environment\): log_level"):
        load_settings(write(tmp_path, ""))


def test_named_instances(tmp_path):
    ok = load_settings(
        write(
            tmp_path,
            "[generators.people_a]\nuse = 'wd_tagger'\ngeneral_threshold = 0.5\n"
            "[[watch]]\npath = '/x'\ngenerators = ['people_a']\n",
        )
    )
    assert ok.watch[0].generators == ["people_a"]
    with pytest.raises(ConfigError, match=r"generators.p.use: unknown generator 'nope'"):
        load_settings(write(tmp_path, "[generators.p]\nuse = 'nope'\n"))
    with pytest.raises(ConfigError, match="is a generator itself"):
        load_settings(write(tmp_path, "[generators.wd_tagger]\nuse = 'wd_tagger'\n"))
    with pytest.raises(ConfigError, match=r"generators.p.general_threshold"):
        load_settings(write(tmp_path, "[generators.p]\nuse = 'wd_tagger'\ngeneral_threshold = 2\n"))


def test_every_problem_is_reported_at_once(tmp_path):
    """Field errors, overlapping folders and unknown generators in one answer, not in
    rounds."""
    a = tmp_path / "a"
    text = f"""
log_level = "loud"
[worker]
batch_size = 0
[[watch]]
path = "{a}"
[[watch]]
path = "{a / "inner"}"
generators = ["no_such_generator"]
[[watch]]
path = "{tmp_path / "b"}"
priority = 999
"""
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    msg = str(exc.value)
    assert "log_level" in msg and "worker.batch_size" in msg and "priority" in msg
    assert "inside watch" in msg  # the overlap, found in the same round
    assert "no_such_generator" in msg


def test_environment_lists_may_be_comma_separated_and_levels_any_case(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIOND_WORKER__PRELOAD", "wd_tagger")
    monkeypatch.setenv("CAPTIOND_LOG_LEVEL", "DEBUG")
    s = load_settings(write(tmp_path, ""))
    assert s.worker.preload == ["wd_tagger"] and s.log_level == "debug"
    monkeypatch.setenv("CAPTIOND_WORKER__PRELOAD", '["wd_tagger", "vlm"]')
    assert load_settings(write(tmp_path, "")).worker.preload == ["wd_tagger", "vlm"]


def test_a_bad_environment_value_is_a_config_error_with_exit_2(tmp_path):
    env = {"CAPTIOND_GENERATORS": "{not json", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(write(tmp_path, "")), "check-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "CAPTIOND_GENERATORS" in out.stderr


def test_a_trainers_config_toml_in_the_current_folder_is_skipped(tmp_path, monkeypatch):
    """kohya and others keep a config.toml in the dataset folder: captiond's commands
    run there must not take it for theirs, and say that they skipped it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAPTIOND_CONFIG", raising=False)
    xdg = tmp_path / "xdg"
    (xdg / "captiond").mkdir(parents=True)
    (xdg / "captiond" / "config.toml").write_text("log_level = 'warning'\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    (tmp_path / "config.toml").write_text(
        "[model_arguments]\npretrained_model_name_or_path = 'x'\n[training_arguments]\nlr = 1\n"
    )
    s = load_settings()
    assert s.log_level == "warning" and s.source == str(xdg / "captiond" / "config.toml")
    assert s.notes and "not a captiond configuration" in s.notes[0]
    # a captiond file with a mistake is still captiond's: its error is shown
    (tmp_path / "config.toml").write_text("log_level = 'loud'\n")
    with pytest.raises(ConfigError):
        load_settings()


def test_a_watched_path_through_a_symlink_is_made_canonical(tmp_path):
    """~/datasets/x -> /mnt/nas/x: one spelling everywhere (the real path), the name
    as written; a path with .. likewise."""
    real = tmp_path / "nas" / "photos2023"
    real.mkdir(parents=True)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "cats").symlink_to(real)
    s = load_settings(
        write(
            tmp_path,
            f'[[watch]]\npath = "{tmp_path}/datasets/cats"\n'
            f'[[watch]]\npath = "{tmp_path}/datasets/../other"\n',
        )
    )
    assert s.watch[0].path == real and s.watch[0].name == "cats"
    assert s.watch[1].path == tmp_path / "other"
    assert s.watch_for(str(real / "a.png")) is s.watch[0]


def test_two_generators_keep_their_caption_type_names(tmp_path):
    s = load_settings(
        write(tmp_path, f'[[watch]]\npath = "{tmp_path}"\ngenerators = ["wd_tagger", "vlm"]\n')
    )
    w = s.watch[0]
    assert (w.extension_for("wd_tagger", "tags"), w.extension_for("vlm", "caption")) == (
        "tags",
        "caption",
    )


def test_decode_workers_default_to_the_cpus_the_daemon_may_use(monkeypatch) -> None:
    from daemon.config import MAX_AUTO_DECODE_WORKERS, WorkerConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert WorkerConfig().decode_threads() == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert WorkerConfig().decode_threads() == MAX_AUTO_DECODE_WORKERS
    assert WorkerConfig(decode_workers=3).decode_threads() == 3
