"""Demo CRA: the MobileOwnership (Shahkar) service over the shared synthetic population."""

import grpc

from tabadol.agencies.cra.v1 import mobile_ownership_pb2 as pb
from tabadol.agencies.cra.v1 import mobile_ownership_pb2_grpc as pb_grpc
from tabadol.demo_agencies import population
from tabadol.identifiers import national_id_problem, normalize_mobile

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MobileOwnership"].full_name


def owns_mobile(national_id: str, mobile: str) -> bool:
    """Whether the line, in its 11-digit form, is registered to the holder of the national id."""
    owner = population.find_mobile_owner(mobile)
    return owner is not None and owner.national_id == national_id


class MobileOwnership(pb_grpc.MobileOwnershipServicer):
    """The CRA's mobile-ownership register, serving the synthetic population's lines."""

    async def MatchMobile(
        self,
        request: pb.MatchMobileRequest,
        context: grpc.aio.ServicerContext[pb.MatchMobileRequest, pb.MatchMobileResponse],
    ) -> pb.MatchMobileResponse:
        problem = national_id_problem(request.national_id)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            mobile = normalize_mobile(request.mobile)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        matched = owns_mobile(request.national_id, mobile)
        return pb.MatchMobileResponse(
            result=pb.MATCH_RESULT_MATCH if matched else pb.MATCH_RESULT_NO_MATCH
        )


def add_to_server(server: grpc.aio.Server) -> None:
    """Registers the demo MobileOwnership service on a server that has not started yet."""
    # The generated registration function has no type hints.
    pb_grpc.add_MobileOwnershipServicer_to_server(MobileOwnership(), server)
