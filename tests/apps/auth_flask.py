"""The README's Flask-Login recipe: ``owner`` asks ``current_user``, which
works because the extension runs it in a request context."""

from flask import Flask, jsonify, request
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user

from deferred_middleware import deferred
from deferred_middleware.flask import FlaskDeferred

from ._common import middleware_options

app = Flask(__name__)
app.secret_key = "a secret for the tests only"
login_manager = LoginManager(app)
USERS = {"alice", "bob"}


class User(UserMixin):
    def __init__(self, name: str) -> None:
        self.id = name


@login_manager.user_loader
def load_user(name: str) -> User | None:
    return User(name) if name in USERS else None


@app.post("/login")
def login():
    name = request.form["name"]
    if name not in USERS:
        return "who?", 403
    login_user(User(name))
    return "welcome"


@app.post("/report")
@deferred
@login_required
def report():
    return jsonify({"made for": current_user.id})


@app.get("/health")
def health():
    return "ok"


FlaskDeferred(
    app,
    owner=lambda request: current_user.get_id() if current_user.is_authenticated else None,
    **middleware_options(),
)
