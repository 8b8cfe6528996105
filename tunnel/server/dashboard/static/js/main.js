// Entry point of the relay's status page: registers the panels and starts the poll loop.
//
// Plain DOM, no framework, no build step, no inline anything (the page runs under a strict
// CSP, default-src 'self'). Every value a client reports (names, host names, GPU names,
// targets, visitor addresses) is put on the page with textContent or setAttribute, never
// parsed as HTML. Relative times use the relay's clock (format.js).
//
// The modules:
//   main.js            this file: the list of panels
//   poll.js            the 2 s loop over the panels, the "updated" chip, pollSoon()
//   api.js             getJSON / post against the relay's API, HttpError
//   dom.js             element builders, change-only setters, keyed rows, meters
//   format.js          value guards for untrusted JSON, sizes, rates, durations, relay clock
//   notice.js          the notice line (outcome of an admin action)
//   chart.js           the rate chart on a canvas
//   panels/*.js        one module per panel (client-card.js is the clients panel's card)
//
// Adding a panel (say "jobs"):
//   1. Write panels/jobs.js, whose default export is a panel:
//        export default {
//          name: "jobs",                     // for people and debuggers only
//          load: () => getJSON("api/jobs"),  // its API call, once per poll
//          render: renderJobs,               // (data) => void; text only, never markup
//          optional: true,                   // optional: its failure leaves it as it was and
//                                            // does not mark the connection lost (except 401)
//          start() {},                       // optional: once, before the first poll;
//        };                                  // may build the panel's <section> into <main>
//      (or give the panel a <section> with ids in index.html, as the panels below do).
//      Keep its rows with syncRows (dom.js) and format with format.js; actions post() and
//      then pollSoon() (poll.js) and showNotice() (notice.js).
//   2. Its API call: a GET route in tunnel/server/dashboard/api.py.
//   3. Import it below and add it to PANELS: that is the whole registration.
// Panels render in PANELS order; status comes first because it sets the relay clock.

import { startPolling } from "./poll.js";
import clients from "./panels/clients.js";
import leases from "./panels/leases.js";
import status from "./panels/status.js";

const PANELS = [status, clients, leases];

// A module script runs once the document is parsed: the panels' elements exist.
startPolling(PANELS);
