"""A real browser (Debian's Chromium driven by Playwright) against the app: upload an example, protect, see the
slider and the metrics, run a short attack, see both generation grids; a screenshot lands in the test's tmp folder."""

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


def test_protect_then_attack_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is required (.ci/run installs it: apt-get install -y chromium)"
    example = sorted((ROOT / "assets" / "examples" / "chelsea" / "train").glob("*.png"))[:2]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(app_url)
        page.locator("#uploads input[type=file]").set_input_files([str(p) for p in example])
        expect(page.locator("#estimate")).to_contain_text("Estimate", timeout=60_000)
        page.locator("#protect").click()
        expect(page.locator("#protect-summary")).to_contain_text("protected 2 photo", timeout=180_000)
        expect(page.locator("#slider img").first).to_be_visible(timeout=30_000)
        expect(page.locator("#metrics")).to_contain_text("chelsea-train-0.png")
        page.get_by_role("tab", name="Attack & compare").click()
        steps = page.locator("#attack-steps input[type=number]")
        steps.fill("2")
        steps.press("Enter")
        page.locator("#attack").click()
        expect(page.locator("#gen-clean img").first).to_be_visible(timeout=240_000)
        expect(page.locator("#gen-protected img").first).to_be_visible(timeout=30_000)
        expect(page.locator("#efficacy")).to_contain_text("post_attack_loss")
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
