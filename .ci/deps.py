"""Print a pyproject's dependencies (plus the named extras) one per line, for pip."""

import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2:]:
    deps += project["optional-dependencies"][extra]
print("\n".join(f"{d}" for d in deps))
