"""The source layout must not shadow the standard library."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_platform_is_the_standard_library_module():
    import platform

    import mvdream_platform

    assert hasattr(platform, "python_version") and callable(platform.machine)
    assert pathlib.Path(platform.__file__).parent == pathlib.Path(pathlib.__file__).parent
    assert pathlib.Path(mvdream_platform.__file__).parent == ROOT / "platform" / "mvdream_platform"
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert sys.modules["platform"] is platform
