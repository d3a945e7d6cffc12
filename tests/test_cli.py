"""`rkd-fast`: every command's --help prints (argparse formats each help text only then, so a broken format
string or a default it cannot format shows up nowhere else)."""

import pytest

from rkd_fast.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: rkd-fast " + command)
