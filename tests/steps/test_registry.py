"""StepRegistry and StepSpec: declaring, validating, looking up and running steps."""

import pickle
import threading

import pytest

from governor.errors import RegistrationError, UnknownStep
from governor.limits import Lane, Limits
from governor.steps import Step, StepClassifier, StepRegistry, StepSpec


def git_status(repo: str = ".") -> str:
    """Report the working tree's status.

    More detail that is not part of the description.
    """
    return f"clean: {repo}"


class CreateChat(Step):
    """Create a chat session."""

    name = "chat.create"
    category = "chat"
    tags = ("write",)
    limits = Limits(timeout_s=30)

    def run(self, title: str, *, private: bool = False) -> str:
        return f"chat {title!r} private={private}"


# -- decorator forms --------------------------------------------------------------------

def test_bare_decorator_registers_under_the_function_name_and_returns_it():
    registry = StepRegistry()

    @registry.step
    def list_files():
        return ["a"]

    assert list_files() == ["a"]
    assert registry.get("list_files").fn is list_files


def test_decorator_with_empty_parentheses():
    registry = StepRegistry()

    @registry.step()
    def list_files():
        """List files."""

    assert registry.get("list_files").description == "List files."


def test_decorator_with_arguments():
    registry = StepRegistry()
    decorated = registry.step(name="git.status", critical=False, limits=Limits(timeout_s=5),
                              category="vcs", tags=["read-only"], description="Status.")(git_status)
    assert decorated is git_status
    assert registry.get("git.status") == StepSpec(
        name="git.status", fn=git_status, critical=False, category="vcs", tags={"read-only"},
        limits=Limits(timeout_s=5), description="Status.")


def test_a_positional_name_is_refused_with_a_hint():
    with pytest.raises(RegistrationError, match=r"@registry.step\(name='git.status'\)"):
        StepRegistry().step("git.status")


def test_register_returns_the_spec_with_defaults():
    spec = StepRegistry().register(git_status)
    assert (spec.name, spec.critical, spec.category, spec.tags, spec.limits) == (
        "git_status", None, None, frozenset(), Limits())
    assert spec.description == "Report the working tree's status."
    assert not spec.is_class_based


def test_name_is_stripped():
    assert StepRegistry().register(git_status, name="  git.status\n").name == "git.status"


# -- class-based steps ------------------------------------------------------------------

def test_step_subclass_attributes_are_the_declaration():
    spec = StepRegistry().register(CreateChat)
    assert (spec.name, spec.category, spec.tags, spec.limits, spec.description) == (
        "chat.create", "chat", {"write"}, Limits(timeout_s=30), "Create a chat session.")
    assert spec.is_class_based


def test_explicit_arguments_win_over_class_attributes():
    spec = StepRegistry().register(CreateChat, name="chat.new", critical=False, category="ui",
                                   tags=("query",), limits=Limits(max_memory_mb=64))
    assert (spec.name, spec.critical, spec.category, spec.tags, spec.limits) == (
        "chat.new", False, "ui", {"query"}, Limits(max_memory_mb=64))


def test_class_without_a_name_attribute_uses_the_class_name():
    class Archive(Step):
        def run(self):
            return "archived"

    spec = StepRegistry().register(Archive)
    assert spec.name == "Archive"
    assert spec.description == ""  # not Step's own docstring


def test_plain_class_with_run_is_a_step():
    class Ping:
        def run(self, host):
            return f"pong {host}"

    assert StepRegistry().register(Ping).invoke(("h",), {}) == "pong h"


def test_invoke_calls_a_function():
    assert StepSpec(name="s", fn=git_status).invoke(("repo",), {}) == "clean: repo"


def test_invoke_instantiates_a_class_per_call():
    instances = []

    class Counter(Step):
        def __init__(self):
            instances.append(self)

        def run(self, **params):
            return params

    spec = StepSpec.declare(Counter)
    assert spec.invoke((), {"a": 1}) == {"a": 1}
    assert spec.invoke((), {}) == {}
    assert len(instances) == 2 and instances[0] is not instances[1]


def test_invoke_passes_positional_and_keyword_arguments_to_run():
    spec = StepSpec.declare(CreateChat)
    assert spec.invoke(("hello",), {"private": True}) == "chat 'hello' private=True"


# -- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "   ", "git status", "a\tb", 42])
def test_invalid_names(name):
    with pytest.raises(RegistrationError, match="step name must be a non-empty string without whitespace"):
        StepRegistry().register(git_status, name=name)


def test_duplicate_name():
    registry = StepRegistry()
    registry.register(git_status, name="git.status")
    with pytest.raises(RegistrationError, match="step 'git.status' is already registered"):
        registry.register(lambda: None, name="git.status")
    assert registry.get("git.status").fn is git_status


@pytest.mark.parametrize("fn", [42, "git_status", None])
def test_not_callable(fn):
    with pytest.raises(RegistrationError, match="step 'x': .* is not callable"):
        StepRegistry().register(fn, name="x")


def test_not_callable_without_a_name_says_so():
    with pytest.raises(RegistrationError, match="is not callable"):
        StepRegistry().register(42)


def test_class_without_run():
    class NoRun:
        pass

    with pytest.raises(RegistrationError, match="class .*NoRun has no run"):
        StepRegistry().register(NoRun)


def test_step_subclass_must_override_run():
    class Lazy(Step):
        pass

    with pytest.raises(RegistrationError, match="does not override Step.run"):
        StepRegistry().register(Lazy)


def test_callable_without_a_name_needs_one():
    class Callable:
        def __call__(self):
            return 1

    with pytest.raises(RegistrationError, match="pass name="):
        StepRegistry().register(Callable())
    assert StepRegistry().register(Callable(), name="call").invoke((), {}) == 1


@pytest.mark.parametrize("critical", [1, 0, "yes"])
def test_critical_must_be_a_bool_or_none(critical):
    with pytest.raises(RegistrationError, match="step 'x': critical must be True, False or None"):
        StepRegistry().register(git_status, name="x", critical=critical)


@pytest.mark.parametrize("limits", [{"timeout_s": 5}, 5])
def test_limits_must_be_a_limits_instance(limits):
    with pytest.raises(RegistrationError, match=r"step 'x': limits must be a Limits instance such as "
                                                r"Limits\(timeout_s=5\), got (dict|int)"):
        StepRegistry().register(git_status, name="x", limits=limits)


@pytest.mark.parametrize("field", ["timeout_s", "max_memory_mb"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_limits_are_refused_by_limits(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field} must be > 0"):
        StepRegistry().register(git_status, limits=Limits(**{field: value}))


def test_tags_must_be_strings():
    with pytest.raises(RegistrationError, match="each tag of step 'x' must be a non-empty string"):
        StepRegistry().register(git_status, name="x", tags=["ok", 3])


def test_a_bare_string_is_not_a_tag_list():
    with pytest.raises(RegistrationError, match=r"step 'x': tags must be an iterable of strings"):
        StepRegistry().register(git_status, name="x", tags="write")


def test_category_must_be_a_word():
    with pytest.raises(RegistrationError, match="category of step 'x' must be a non-empty string"):
        StepRegistry().register(git_status, name="x", category="two words")


def test_a_failed_registration_registers_nothing():
    registry = StepRegistry()
    with pytest.raises(RegistrationError):
        registry.register(git_status, limits=5)
    assert len(registry) == 0


# -- lookup -----------------------------------------------------------------------------

def test_unknown_step_suggests_close_names():
    registry = StepRegistry()
    registry.register(git_status, name="git.status")
    with pytest.raises(UnknownStep) as caught:
        registry.get("git.stats")
    assert caught.value.suggestions == ("git.status",)
    assert "did you mean 'git.status'" in str(caught.value)
    assert isinstance(caught.value, KeyError)


def test_container_protocol_keeps_registration_order():
    registry = StepRegistry()
    for name in ["b", "a", "c"]:
        registry.register(git_status, name=name)
    assert list(registry) == registry.names() == ["b", "a", "c"]
    assert len(registry) == 3
    assert "a" in registry and "z" not in registry


def test_snapshot_is_a_copy():
    registry = StepRegistry()
    registry.register(git_status, name="one")
    snapshot = registry.snapshot()
    registry.register(git_status, name="two")
    snapshot.pop("one")
    assert snapshot == {}
    assert registry.names() == ["one", "two"]


def test_classify_by_name_uses_the_registry_classifier():
    registry = StepRegistry()
    registry.register(git_status, name="git.status")
    registry.register(CreateChat)
    assert registry.classify("chat.create").lane is Lane.CRITICAL
    assert registry.classify("git.status").reason.startswith("no rule matched")
    registry.classifier.add_pattern("git.*", Lane.POOL)  # rules added later still apply
    assert registry.classify("git.status").lane is Lane.POOL
    with pytest.raises(UnknownStep):
        registry.classify("nope")


def test_a_custom_classifier():
    registry = StepRegistry(StepClassifier(patterns={"*": "pool"}))
    registry.register(git_status, name="chat.create")
    assert registry.classify("chat.create").lane is Lane.POOL


# -- processes and threads --------------------------------------------------------------

@pytest.mark.parametrize("fn", [git_status, CreateChat])
def test_spec_pickles_with_its_step_by_reference(fn):
    spec = StepRegistry().register(fn, limits=Limits(timeout_s=2), tags=("query",))
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec and copy.fn is fn


def test_concurrent_registration_keeps_every_name():
    registry = StepRegistry()
    start = threading.Barrier(8)

    def register_many(thread: int) -> None:
        start.wait()
        for index in range(100):
            registry.register(git_status, name=f"t{thread}.s{index}")

    threads = [threading.Thread(target=register_many, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(registry) == sorted(f"t{t}.s{i}" for t in range(8) for i in range(100))


def test_concurrent_duplicates_register_once():
    registry = StepRegistry()
    start = threading.Barrier(8)
    errors = []

    def register_same() -> None:
        start.wait()
        try:
            registry.register(git_status, name="same")
        except RegistrationError as error:
            errors.append(error)

    threads = [threading.Thread(target=register_same) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(registry) == 1 and len(errors) == 7
