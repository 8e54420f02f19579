# tests/console.rs: the web console driven in a real browser over WebDriver
# (headless Chromium and its driver, from Debian).
APT_PACKAGES+=(chromium chromium-driver)
