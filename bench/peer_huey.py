"""huey (SqliteHuey) running the same trivial task, for the side-by-side run.
The file comes from HUEY_DB, set before this module is imported."""

import os

from huey import SqliteHuey

huey = SqliteHuey(filename=os.environ["HUEY_DB"])


@huey.task()
def trivial(n: int) -> int:
    return n
