"""The source root is named ``platform/``: it must never become a package that shadows the standard
library's ``platform`` (ray and torch import it), and the CLI must not import the heavy runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "platform"


def _py(code: str) -> dict:
    """Run ``code`` in a fresh interpreter from the repo root; it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_platform_has_no_init_py():
    assert SRC.is_dir() and (SRC / "zeroplane" / "__init__.py").is_file()
    assert not (SRC / "__init__.py").exists()
    assert not (SRC / "__init__.pyc").exists()


def test_import_platform_gets_the_standard_library():
    code = (
        "import sys, json, os, sysconfig\n"
        f"sys.path.insert(0, {str(SRC)!r})\n"   # the source root, as the editable install adds it
        f"sys.path.insert(0, {str(REPO)!r})\n"  # and the repo root, which contains the folder `platform/`
        "import platform\n"
        "print(json.dumps({'file': getattr(platform, '__file__', None), 'system': platform.system(),\n"
        "  'machine': platform.machine(), 'stdlib': sysconfig.get_paths()['stdlib'],\n"
        "  'cwd_first': os.path.realpath(sys.path[0])}))\n"
    )
    res = _py(code)
    assert res["cwd_first"] == str(REPO.resolve())
    assert res["file"] is not None, "`platform` resolved to a namespace package"
    assert Path(res["file"]).resolve().parent == Path(res["stdlib"]).resolve()
    assert Path(res["file"]).name == "platform.py"
    assert res["system"] in {"Linux", "Darwin", "Windows"} and res["machine"]


def test_editable_install_puts_the_source_root_on_sys_path():
    code = "import sys, json, zeroplane; print(json.dumps({'path': sys.path, 'file': zeroplane.__file__}))"
    res = _py(code)
    assert Path(res["file"]).resolve().parent == (SRC / "zeroplane").resolve()


def test_cli_import_and_help_do_not_load_the_runtime():
    code = (
        "import sys, json, io, contextlib\n"
        "import zeroplane.cli.main as m\n"
        "after_import = sorted(x for x in ('torch', 'ray.train', 'deepspeed') if x in sys.modules)\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        m.main(['--help'])\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "after_help = sorted(x for x in ('torch', 'ray.train', 'deepspeed') if x in sys.modules)\n"
        "print(json.dumps({'import': after_import, 'help': after_help, 'code': code, 'out': buf.getvalue()}))\n"
    )
    res = _py(code)
    assert res["import"] == []
    assert res["help"] == []
    assert res["code"] == 0 and "train" in res["out"]


def test_spec_validation_and_dry_run_do_not_load_the_runtime():
    # transformers' import-free model-type table (auto_mappings) may load: the spec checks the model
    # type with it; its configuration/modeling code (which imports torch) may not.
    code = (
        "import sys, json, io, contextlib\n"
        "from zeroplane.cli.main import main\n"
        "buf = io.StringIO()\n"
        "codes = []\n"
        "for args in (['spec', 'validate', 'jobs/tiny-cpu.yaml'], ['train', 'submit', 'jobs/tiny-cpu.yaml', '--dry-run']):\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            main(args)\n"
        "        except SystemExit as e:\n"
        "            codes.append(e.code)\n"
        "print(json.dumps({'codes': codes,\n"
        "  'loaded': sorted(x for x in ('torch', 'ray.train', 'deepspeed', 'transformers.configuration_utils',\n"
        "                               'transformers.modeling_utils') if x in sys.modules)}))\n"
    )
    res = _py(code)
    assert res["codes"] == [0, 0]
    assert res["loaded"] == []
