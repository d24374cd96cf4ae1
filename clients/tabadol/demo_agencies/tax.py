"""Demo INTA: the InvoiceRegistry service, checking invoices against the synthetic population."""

import random
import uuid
from collections.abc import AsyncIterator

import grpc

from tabadol.agencies.tax.v1 import invoice_registry_pb2 as pb
from tabadol.agencies.tax.v1 import invoice_registry_pb2_grpc as pb_grpc
from tabadol.demo_agencies import population
from tabadol.demo_agencies.solar_hijri import SolarDate, date_problem
from tabadol.identifiers import national_id_problem
from tabadol.type.v1 import date_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InvoiceRegistry"].full_name

_INT64_MAX = 2**63 - 1
_VAT_RATE_PERCENT = 10
# (description, unit price in rials, whether value-added tax applies)
_GOODS = (
    ("Rice, 10 kg bag", 25_000_000, False),
    ("Bread, sangak", 100_000, False),
    ("Tea, 500 g", 3_000_000, True),
    ("Cooking oil, 1.8 l", 1_500_000, True),
    ("Laptop", 450_000_000, True),
    ("Appliance repair, 1 hour", 8_000_000, True),
)


def invoice_problem(invoice: pb.Invoice) -> str | None:
    """Why the registry rejects an invoice on its own merits, or None when it does not."""
    if not invoice.invoice_number:
        return "invoice_number is empty"
    for field in ("seller_national_id", "buyer_national_id"):
        problem = national_id_problem(getattr(invoice, field))
        if problem is not None:
            return f"{field}: {problem}"
    if population.find_person(invoice.seller_national_id) is None:
        return f"seller_national_id {invoice.seller_national_id} is not a registered taxpayer"
    if not invoice.HasField("issue_date"):
        return "issue_date is missing"
    issue_date = SolarDate(
        invoice.issue_date.year, invoice.issue_date.month, invoice.issue_date.day
    )
    problem = date_problem(issue_date)
    if problem is not None:
        return f"issue_date {issue_date}: {problem}"
    if not invoice.line_items:
        return "line_items is empty: an invoice sells at least one thing"
    for position, item in enumerate(invoice.line_items):
        if item.quantity < 1:
            return f"line_items[{position}].quantity is {item.quantity}; it must be at least 1"
        if item.unit_price_rials < 0:
            return f"line_items[{position}].unit_price_rials is negative"
        if item.vat_rials < 0:
            return f"line_items[{position}].vat_rials is negative"
    expected = sum(
        item.quantity * item.unit_price_rials + item.vat_rials for item in invoice.line_items
    )
    if invoice.total_rials != expected:
        return f"total_rials is {invoice.total_rials} but the line items add up to {expected}"
    return None


class Submission:
    """The receipt of one SubmitInvoices call, updated as each invoice arrives."""

    def __init__(self, receipt_id: str) -> None:
        self.receipt = pb.SubmissionReceipt(receipt_id=receipt_id)
        self._received = 0
        self._numbers: set[tuple[str, str]] = set()

    def add(self, invoice: pb.Invoice) -> None:
        """Accepts the invoice into the receipt's sums, or records why it is rejected."""
        index, self._received = self._received, self._received + 1
        problem = invoice_problem(invoice) or self._submission_problem(invoice)
        if problem is not None:
            self.receipt.rejected_count += 1
            self.receipt.rejections.add(
                index=index, invoice_number=invoice.invoice_number, reason=problem
            )
            return
        self._numbers.add((invoice.seller_national_id, invoice.invoice_number))
        self.receipt.accepted_count += 1
        self.receipt.accepted_total_rials += invoice.total_rials
        # Cannot overflow: amounts are not negative, so VAT never exceeds the checked total.
        self.receipt.accepted_vat_rials += sum(item.vat_rials for item in invoice.line_items)

    def _submission_problem(self, invoice: pb.Invoice) -> str | None:
        if (invoice.seller_national_id, invoice.invoice_number) in self._numbers:
            return (
                f"invoice_number {invoice.invoice_number} was already sent by seller"
                f" {invoice.seller_national_id} in this submission"
            )
        if self.receipt.accepted_total_rials > _INT64_MAX - invoice.total_rials:
            return (
                "accepting this invoice would overflow the receipt's totals; submit it separately"
            )
        return None


def sample_invoice(rng: random.Random | None = None) -> pb.Invoice:
    """A valid invoice between two people of the population, for demo traffic."""
    rng = rng if rng is not None else random.Random()
    seller = population.sample_person(rng)
    buyer = population.sample_person(rng)
    invoice = pb.Invoice(
        invoice_number=f"1403-{rng.randrange(10**6):06d}",
        seller_national_id=seller.national_id,
        buyer_national_id=buyer.national_id,
        issue_date=date_pb2.Date(year=1403, month=rng.randint(1, 12), day=rng.randint(1, 29)),
    )
    for description, unit_price, taxed in rng.sample(_GOODS, rng.randint(1, 3)):
        quantity = rng.randint(1, 5)
        vat = quantity * unit_price * _VAT_RATE_PERCENT // 100 if taxed else 0
        invoice.line_items.add(
            description=description, quantity=quantity, unit_price_rials=unit_price, vat_rials=vat
        )
        invoice.total_rials += quantity * unit_price + vat
    return invoice


class InvoiceRegistry(pb_grpc.InvoiceRegistryServicer):
    """The national invoice register, accepting invoices from the synthetic population."""

    async def SubmitInvoices(
        self,
        request_iterator: AsyncIterator[pb.Invoice],
        context: grpc.aio.ServicerContext[pb.Invoice, pb.SubmissionReceipt],
    ) -> pb.SubmissionReceipt:
        submission = Submission(receipt_id=uuid.uuid4().hex)
        async for invoice in request_iterator:
            submission.add(invoice)
        return submission.receipt


def add_to_server(server: grpc.aio.Server) -> None:
    """Registers the demo InvoiceRegistry on a server that has not started yet."""
    # The generated registration function has no type hints.
    pb_grpc.add_InvoiceRegistryServicer_to_server(InvoiceRegistry(), server)
