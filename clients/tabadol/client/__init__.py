"""What an agency's microservice needs to use Tabadol, as consumer or as provider.

Consumer::

    channel = tabadol.client.connect("broker.example:7443", "credentials/")
    # or several broker nodes: connect(["10.0.0.1:7443", "10.0.0.2:7443"], "credentials/")
    stub = person_registry_pb2_grpc.PersonRegistryStub(channel)

Provider::

    provider = tabadol.client.ProviderServer("credentials/", listen="0.0.0.0:9101")
    person_registry_pb2_grpc.add_PersonRegistryServicer_to_server(Servicer(), provider.server)
    await provider.start()
    # in a handler: tabadol.client.consumer_agency(context) -> "post"
    # and tabadol.client.purpose(context) -> the legal basis of the grant that admitted it
"""

from tabadol.client.call_status import keep_call_status
from tabadol.client.consumer import connect
from tabadol.client.credentials import AgencyCredentials
from tabadol.client.nodes import BrokerAddressError
from tabadol.client.provider import ProviderServer, consumer_agency, grant, purpose, request_id

__all__ = [
    "AgencyCredentials",
    "BrokerAddressError",
    "ProviderServer",
    "connect",
    "consumer_agency",
    "grant",
    "keep_call_status",
    "purpose",
    "request_id",
]
