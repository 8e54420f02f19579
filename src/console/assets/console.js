// The console's only script, served from the binary (CSP: script-src 'self').
// The pages work without it; it adds two conveniences.
document.addEventListener("DOMContentLoaded", function () {
  // A one-time sign-in URL (`karibche console login`) carries the token in its
  // fragment, which browsers never send: put it in the form and post it.
  // Opened on a sign-in page already shown, the URL only changes its fragment
  // (no new page load): watch for that too.
  var form = document.getElementById("signin-form");
  var token = document.getElementById("token");
  function signInFromFragment() {
    if (form && token && location.hash.indexOf("#token=") === 0) {
      token.value = decodeURIComponent(location.hash.slice(7));
      history.replaceState(null, "", location.pathname);
      form.submit();
    }
  }
  signInFromFragment();
  window.addEventListener("hashchange", signInFromFragment);
  var print = document.getElementById("print");
  if (print) {
    print.addEventListener("click", function () { window.print(); });
  }
});
