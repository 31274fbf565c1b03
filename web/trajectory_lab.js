// Trajectory Lab frontend extension (served through WEB_DIRECTORY). Node widgets arrive with the
// techniques; this registers the extension so the frontend reports it as loaded.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "trajectory_lab.core",
});
