"""The deployment's files read as the tests check them: the Dockerfile as its stages and instructions."""
import json
import os

from . import ROOT

DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def dockerfile_instructions(text):
    """[(KEYWORD, arguments)] of a Dockerfile: continuations joined, comment lines dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not current and not line.strip()):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def stages(instructions):
    """[{"name", "from", "instructions"}] in order."""
    result = []
    for keyword, args in instructions:
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(result))
            result.append({"name": name, "from": words[0], "instructions": []})
        elif result:
            result[-1]["instructions"].append((keyword, args))
    return result


def healthcheck_command(dockerfile):
    args = [a for k, a in dockerfile[-1]["instructions"] if k == "HEALTHCHECK"][-1]
    assert "--start-period" in args  # loading the model takes a while
    return json.loads(args[args.index("CMD") + 3:].strip())
