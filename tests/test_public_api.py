"""Each package has one public face: ``__all__`` lists exactly what it offers."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
from types import ModuleType

import pytest

import actors
import engine

PACKAGES = [engine, actors]

# Public submodules DESIGN.md names (engine.events, engine.validation, ...);
# every other module of a package is private (a leading underscore).
PUBLIC_SUBMODULES = {
    # prometheus is public but optional (the prometheus extra): not imported by engine.
    "engine": {
        "asgi",
        "cache",
        "catalog",
        "cluster",
        "events",
        "prometheus",
        "tenancy",
        "testing",
        "validation",
    },
    "actors": set(),
}


def submodules(package: ModuleType) -> list[str]:
    return [info.name for info in pkgutil.iter_modules(package.__path__)]


def public_modules() -> list[ModuleType]:
    modules = list(PACKAGES)
    for package in PACKAGES:
        for name in submodules(package):
            if not name.startswith("_"):
                modules.append(importlib.import_module(f"{package.__name__}.{name}"))
    return modules


MODULES = public_modules()
MODULE_IDS = [module.__name__ for module in MODULES]


def exported(module: ModuleType) -> list[object]:
    return [getattr(module, name) for name in module.__all__]


@pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
def test_every_name_in_all_exists_and_is_public(module: ModuleType) -> None:
    assert isinstance(module.__all__, list | tuple)
    assert all(isinstance(name, str) for name in module.__all__)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []
    assert [name for name in module.__all__ if name.startswith("_")] == []


@pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
def test_all_has_no_duplicates(module: ModuleType) -> None:
    assert len(module.__all__) == len(set(module.__all__))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_a_package_shows_exactly_its_all_besides_its_public_submodules(
    package: ModuleType,
) -> None:
    # Import every public submodule first: importing one binds it on the package.
    public_modules()
    # pytest rewrites the asserts of a plugin's packages (engine ships one, engine.testing),
    # which leaves names like "@py_builtins" behind: not identifiers, so no one's API.
    names = {name for name in dir(package) if not name.startswith("_") and name.isidentifier()}
    modules = {name for name in names if inspect.ismodule(getattr(package, name))}
    assert modules <= PUBLIC_SUBMODULES[package.__name__]
    # A public submodule may be listed in __all__ or not; everything else must be.
    assert names - modules == set(package.__all__) - modules


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_implementation_modules_are_private(package: ModuleType) -> None:
    public = {name for name in submodules(package) if not name.startswith("_")}
    assert public <= PUBLIC_SUBMODULES[package.__name__]


@pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
def test_every_class_and_function_a_module_defines_is_exported(module: ModuleType) -> None:
    leaked = [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
        and name not in module.__all__
    ]
    assert leaked == []


def test_exported_classes_never_report_a_private_module() -> None:
    for obj in exported(engine):
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert not obj.__module__.startswith("engine._"), obj


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_packages_are_typed(package: ModuleType) -> None:
    assert package.__file__ is not None
    assert (pathlib.Path(package.__file__).parent / "py.typed").is_file()


def test_the_documented_runtime_names_are_exported() -> None:
    documented = {
        "Actor",
        "ActorRef",
        "ActorStatistics",
        "ActorStopped",
        "AskTimeout",
        "Backoff",
        "DeadLetter",
        "Engine",
        "EngineError",
        "EngineMetrics",
        "Health",
        "MailboxFull",
        "Overflow",
        "Restart",
        "Strategy",
        "SupervisorEscalation",
        "SupervisorRef",
    }
    assert documented <= set(engine.__all__)


# ------------------------------------------------------------------- errors


def exported_errors() -> dict[str, type[BaseException]]:
    errors: dict[str, type[BaseException]] = {}
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                errors[f"{module.__name__}.{name}"] = obj
    return errors


def test_every_exported_error_derives_from_engine_error() -> None:
    errors = exported_errors()
    assert "engine.EngineError" in errors
    assert {
        name: error for name, error in errors.items() if not issubclass(error, engine.EngineError)
    } == {}


def test_every_exported_error_is_an_exception_not_a_base_exception() -> None:
    # except Exception must catch them: only interrupts and cancellation escape it.
    assert all(issubclass(error, Exception) for error in exported_errors().values())


def test_ask_timeout_is_a_timeout_error() -> None:
    assert issubclass(engine.AskTimeout, TimeoutError)
    assert issubclass(engine.AskTimeout, engine.EngineError)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("engine", "EventValidationError"),
        ("engine.events", "EventValidationError"),
        ("engine", "TenantValidationError"),
        ("engine.tenancy", "TenantValidationError"),
    ],
)
def test_validation_errors_are_value_errors(module: str, name: str) -> None:
    error = getattr(importlib.import_module(module), name, None)
    if error is None:
        pytest.skip(f"{module} does not export {name} yet")
    assert issubclass(error, ValueError)
    assert issubclass(error, engine.EngineError)


def test_leaf_errors_are_distinct() -> None:
    leaves = [error for error in exported_errors().values() if error is not engine.EngineError]
    # Named for what happened: no leaf is another leaf under a second name.
    assert len({id(error) for error in leaves}) == len({error.__name__ for error in leaves})
