from importlib.metadata import EntryPoint

from daemon.generators import registry


def test_builtins_are_discovered():
    found = registry.discover()
    assert found["wd_tagger"].cls is not None
    assert found["wd_tagger"].availability().ok


def test_entry_point_generators_and_broken_ones(monkeypatch):
    eps = [
        EntryPoint("echo", "tests.fakegen:EchoGenerator", registry.ENTRY_POINT_GROUP),
        EntryPoint("broken", "no_such_module_xyz:Gen", registry.ENTRY_POINT_GROUP),
        EntryPoint("notagen", "tests.fakegen:crash_if_marked", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    found = registry.discover()
    assert found["echo"].cls.__name__ == "EchoGenerator"
    assert found["broken"].cls is None
    assert "no_such_module_xyz" in found["broken"].error
    assert not found["broken"].availability().ok
    assert "not a Generator subclass" in found["notagen"].error


def test_missing_dependency_disables_only_that_generator(monkeypatch):
    from daemon.generators import wd_tagger
    from daemon.residency.manager import ModelManager
    from daemon.residency.slot import ModelState

    monkeypatch.setattr(
        wd_tagger.WDTagger,
        "is_available",
        classmethod(lambda cls: registry.Availability(False, "onnxruntime is not installed")),
    )
    eps = [EntryPoint("echo", "tests.fakegen:EchoGenerator", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    manager = ModelManager.build(
        ["wd_tagger", "echo"], registry.discover(), lambda name, cls: cls.config_model()
    )
    assert manager.get("wd_tagger").state is ModelState.UNAVAILABLE
    assert manager.status()["wd_tagger"]["reason"] == "onnxruntime is not installed"
    assert manager.get("echo").ensure_loaded()
