"""The mutation check (tests/mutations.py): every deliberate breakage is caught."""

import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_every_mutation_is_killed_by_the_default_set():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "mutations.py")],
                        capture_output=True, text=True, timeout=3600, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert "survived" not in proc.stdout and "| error |" not in proc.stdout


def test_every_mutation_target_is_in_the_code_once(tmp_path):
  """Cheap half of the check, in the default set: a refactor that moves a target fails
  here, and a target that is not found is an error, never a kill."""
  import mutations

  for m in mutations.MUTATIONS:
    with open(os.path.join(REPO, m.path)) as f:
      assert f.read().count(m.old) == 1, m.name
    for test in m.tests:
      assert os.path.exists(os.path.join(REPO, test.split("::")[0])), (m.name, test)
  (tmp_path / "x.py").write_text("a = 1\n")
  moved = mutations.Mutation("moved", "", "x.py", "a = 2\n", "a = 3\n", ())
  with pytest.raises(mutations.TargetNotFound, match="occurs 0 times"):
    mutations._apply(str(tmp_path), moved)
