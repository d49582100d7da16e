"""The site side of federation: a Flower ``ClientApp`` that trains on its own folder only.

The work itself (what is trained, evaluated and measured, and exactly what leaves the site) is in
:mod:`fadal.federated.site_task`; this module only routes Flower's messages to it, inside two mods:
:func:`~fadal.federated.site_errors.opaque_errors` outermost (an exception reaches the coordinator
as an opaque code only) and SecAgg+'s.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fadal.federated.secure_aggregation_site import is_secure_train, secagg_when_asked, secure_train
from fadal.federated.site_errors import opaque_errors
from fadal.federated.site_task import (SiteRuntime, local_evaluate, local_fingerprint, local_train,
                                       site_from_node_config)


def build_client_app(sites: list[SiteRuntime] | None = None) -> ClientApp:
    """``sites`` given: simulation (``partition-id`` picks one); ``None``: deployment (``node_config``).

    Serves plain and SecAgg+ federations alike: SecAgg+ train messages go through Flower's
    ``secaggplus_mod`` and :func:`fadal.federated.secure_aggregation.secure_train`."""

    def runtime_for(context: Context) -> SiteRuntime:
        if sites is None:
            return site_from_node_config(dict(context.node_config))
        return sites[int(context.node_config["partition-id"])]

    app = ClientApp(mods=[opaque_errors, secagg_when_asked(lambda context: runtime_for(context).policy)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if is_secure_train(msg):
            return secure_train(msg, runtime_for(context))
        return local_train(msg, runtime_for(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return local_evaluate(msg, runtime_for(context))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return local_fingerprint(msg, runtime_for(context))

    return app


#: Deployment entry point (``[tool.flwr.app.components] clientapp``).
app = build_client_app()
