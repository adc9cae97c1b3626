import httpx
from jobs.settings import Settings
from tests import imagegen
from tests.conftest import Partner, run_burst
from tests.test_spine import upload
async def test_probe(client: httpx.AsyncClient, account: Partner, settings: Settings) -> None:
    r = await upload(client, account, imagegen.truncated_jpeg())
    await run_burst(settings)
    print("MSG", (await client.get(f"/v1/images/{r.json()['id']}", headers=account.headers)).json()["error"])
    r = await upload(client, account, imagegen.truncated_jpeg(), operations='[{"type":"resize","params":{"width":10}}]')
    await run_burst(settings)
    print("MSG", (await client.get(f"/v1/images/{r.json()['id']}", headers=account.headers)).json()["error"])
