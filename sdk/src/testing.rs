//! Helpers for testing plugins: build a plugin crate's `cdylib` from a test, so the test can
//! load exactly what the gateway would.
//!
//! Builds go to `<workspace target>/plugin-builds/<flavour>` rather than the target directory
//! the tests themselves run from: `cargo test` holds that directory's lock while tests run, so
//! a nested build there would wait forever.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How to build a plugin library.
#[derive(Debug, Clone, Default)]
pub struct Build {
    /// The cargo package to build.
    pub package: String,
    /// Build with `--release`.
    pub release: bool,
    /// Extra `rustc` flags for the plugin crate itself (through `cargo rustc`), for example
    /// `["-C", "panic=abort"]`.
    pub rustc_args: Vec<String>,
    /// Sub-directory of `plugin-builds` to build in; builds with different flags must not
    /// share one. Default: `"default"`.
    pub flavour: Option<String>,
    /// Directory inside the workspace to run cargo from. Default: the current directory.
    pub workspace: Option<PathBuf>,
}

impl Build {
    /// A debug build of `package`.
    pub fn new(package: &str) -> Self {
        Self { package: package.to_owned(), ..Self::default() }
    }

    /// Builds and returns the path of the produced shared library.
    pub fn run(&self) -> Result<PathBuf, String> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = target_directory(&cargo, self.workspace.as_deref())?
            .join("plugin-builds")
            .join(self.flavour.as_deref().unwrap_or("default"));
        let mut command = Command::new(&cargo);
        if let Some(dir) = &self.workspace {
            command.current_dir(dir);
        }
        command.arg(if self.rustc_args.is_empty() { "build" } else { "rustc" });
        command.args(["--quiet", "--lib", "--message-format=json-render-diagnostics", "-p", &self.package]);
        command.arg("--target-dir").arg(&target_dir);
        if self.release {
            command.arg("--release");
        }
        if !self.rustc_args.is_empty() {
            command.arg("--").args(&self.rustc_args);
        }
        let output = command.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!("building `{}` failed:\n{}", self.package, String::from_utf8_lossy(&output.stderr)));
        }
        cdylib_artifact(&String::from_utf8_lossy(&output.stdout), &self.package)
            .ok_or_else(|| format!("cargo built `{}` but reported no cdylib", self.package))
    }
}

/// A debug build of `package`; panics with cargo's output if the build fails.
pub fn build_cdylib(package: &str) -> PathBuf {
    Build::new(package).run().unwrap_or_else(|e| panic!("{e}"))
}

fn target_directory(cargo: &std::ffi::OsStr, workspace: Option<&Path>) -> Result<PathBuf, String> {
    let mut command = Command::new(cargo);
    if let Some(dir) = workspace {
        command.current_dir(dir);
    }
    let output = command
        .args(["metadata", "--format-version=1", "--no-deps", "--offline"])
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        // Outside a workspace (a binary run from elsewhere), cargo says so on stderr.
        let why = String::from_utf8_lossy(&output.stderr);
        return Err(format!("cargo metadata ({}): {}", output.status, why.trim()));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    metadata["target_directory"].as_str().map(PathBuf::from).ok_or_else(|| "cargo metadata: no target_directory".into())
}

/// Finds the shared library of `package` among cargo's JSON messages.
fn cdylib_artifact(messages: &str, package: &str) -> Option<PathBuf> {
    let lib_name = package.replace('-', "_");
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && (m["target"]["name"] == lib_name.as_str() || m["target"]["name"] == package)
        })
        .filter(|m| m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib")))
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| is_shared_library(f))
}

fn is_shared_library(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

/// Runs a plugin in-process, through the same JSON dispatch the C ABI uses, so a test sees
/// exactly what the gateway would — without building or loading a library.
///
/// ```
/// use cardgate_sdk::testing::{Harness, RequestBuilder, assert_balances};
/// use cardgate_sdk::{ItemCategory, Plugin, PluginError, SettlementRequest, Split, FundPayment};
///
/// struct Half;
/// impl Plugin for Half {
///     type Config = ();
///     fn new((): ()) -> Result<Self, PluginError> { Ok(Half) }
///     fn quote(&self, r: &SettlementRequest) -> Result<Split, PluginError> {
///         let fund = r.due_fen / 2;
///         Ok(Split { funds: vec![FundPayment { fund: "half".into(), amount_fen: fund }],
///                    cash_pay_fen: r.due_fen - fund, ..Split::default() })
///     }
/// }
///
/// let plugin = Harness::<Half>::new(serde_json::json!(null)).unwrap();
/// let request = RequestBuilder::new().line(ItemCategory::ClassA, 1001).build();
/// let split = plugin.settle(&request).unwrap();
/// assert_balances(&split, request.due_fen);
/// assert_eq!(split.fund_pay_fen(), 500);
/// ```
#[derive(Debug)]
pub struct Harness<P: crate::Plugin> {
    plugin: P,
}

impl<P: crate::Plugin> Harness<P> {
    /// Builds the plugin from a JSON configuration, as the gateway's init does.
    pub fn new(config: serde_json::Value) -> Result<Self, crate::PluginError> {
        let config: P::Config = serde_json::from_value(config)
            .map_err(|e| crate::PluginError::invalid_config(format!("configuration does not decode: {e}")))?;
        Ok(Self { plugin: P::new(config)? })
    }

    fn call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        operation: crate::Operation,
        request: &Req,
    ) -> Result<Resp, crate::PluginError> {
        let input = serde_json::to_vec(request).map_err(|e| crate::PluginError::internal(e.to_string()))?;
        match crate::dispatch(&self.plugin, operation, &input) {
            Ok(output) => serde_json::from_slice(&output).map_err(|e| crate::PluginError::internal(e.to_string())),
            Err(crate::DispatchError::Plugin(e)) => Err(e),
            Err(other) => Err(crate::PluginError::internal(other.to_string())),
        }
    }

    /// `quote`, JSON both ways.
    pub fn quote(&self, request: &crate::SettlementRequest) -> Result<crate::Split, crate::PluginError> {
        self.call(crate::Operation::Quote, request)
    }

    /// `settle`, JSON both ways.
    pub fn settle(&self, request: &crate::SettlementRequest) -> Result<crate::Split, crate::PluginError> {
        self.call(crate::Operation::Settle, request)
    }

    /// `inquire`, JSON both ways.
    pub fn inquire(&self, request: &crate::InquiryRequest) -> Result<crate::Inquiry, crate::PluginError> {
        self.call(crate::Operation::Inquire, request)
    }

    /// `reverse`, JSON both ways.
    pub fn reverse(&self, request: &crate::ReversalRequest) -> Result<crate::Reversal, crate::PluginError> {
        self.call(crate::Operation::Reverse, request)
    }

    /// The plugin itself.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }
}

/// Builds settlement requests for tests: an employee-insured (310) Beijing card at a tertiary
/// hospital, nothing settled this year, no earlier payer — change what the test is about.
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    request: crate::SettlementRequest,
    due: Option<crate::Fen>,
}

impl Default for RequestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestBuilder {
    /// The defaults.
    pub fn new() -> Self {
        Self {
            request: crate::SettlementRequest {
                settlement_id: "S-TEST".into(),
                card: crate::CardClaims {
                    card_id: "110105199001011234".into(),
                    holder_name: "Test Holder".into(),
                    insured_region: "110105".into(),
                    insurance_types: vec!["310".into()],
                    delegate: None,
                },
                institution: crate::Institution {
                    id: "H110105001".into(),
                    level: crate::InstitutionLevel::Tertiary,
                    region: "110105".into(),
                },
                insurance_type: "310".into(),
                lines: Vec::new(),
                total_fen: 0,
                due_fen: 0,
                prior: Vec::new(),
                year_to_date: crate::YearToDate { year: 2026, ..crate::YearToDate::default() },
                use_account: true,
                encounter: None,
            },
            due: None,
        }
    }

    /// The card id.
    pub fn card(mut self, card_id: &str) -> Self {
        self.request.card.card_id = card_id.into();
        self
    }

    /// The insurance type, held by the card and settled under.
    pub fn insurance_type(mut self, code: &str) -> Self {
        self.request.card.insurance_types = vec![code.into()];
        self.request.insurance_type = code.into();
        self
    }

    /// The insured region.
    pub fn insured_region(mut self, code: &str) -> Self {
        self.request.card.insured_region = code.into();
        self
    }

    /// The institution's level.
    pub fn level(mut self, level: crate::InstitutionLevel) -> Self {
        self.request.institution.level = level;
        self
    }

    /// Adds a bill line as given (several units, a catalogue entry).
    pub fn bill_line(mut self, line: crate::BillLine) -> Self {
        self.request.lines.push(line);
        self
    }

    /// Adds a one-unit bill line.
    pub fn line(mut self, category: crate::ItemCategory, amount_fen: crate::Fen) -> Self {
        let n = self.request.lines.len() + 1;
        self.request.lines.push(crate::BillLine {
            code: format!("ITEM{n}"),
            name: format!("item {n}"),
            category,
            quantity: crate::Decimal4::ONE,
            unit_price_fen: crate::Decimal4::from_whole(amount_fen).unwrap_or_default(),
            amount_fen,
            catalogue: None,
        });
        self
    }

    /// The person's accumulators with this payer.
    pub fn year_to_date(mut self, ytd: crate::YearToDate) -> Self {
        self.request.year_to_date = ytd;
        self
    }

    /// An earlier payer in the chain; what is due becomes what it left in cash unless `due`
    /// says otherwise.
    pub fn after(
        mut self,
        payer: &str,
        fund_fen: crate::Fen,
        account_fen: crate::Fen,
        eligible_self_pay_fen: crate::Fen,
    ) -> Self {
        self.request.prior.push(crate::PriorPayment {
            payer: payer.into(),
            fund_pay_fen: fund_fen,
            account_pay_fen: account_fen,
            eligible_self_pay_fen,
            eligible_borne_fen: 0,
        });
        self
    }

    /// What this payer must split (default: the total less what earlier payers paid).
    pub fn due(mut self, due_fen: crate::Fen) -> Self {
        self.due = Some(due_fen);
        self
    }

    /// Whether the patient agrees to pay from the personal account.
    pub fn use_account(mut self, yes: bool) -> Self {
        self.request.use_account = yes;
        self
    }

    /// The encounter the bill is settled in (a hospital's visit or stay).
    pub fn encounter(mut self, encounter: crate::EncounterInfo) -> Self {
        self.request.encounter = Some(encounter);
        self
    }

    /// The request, with `total_fen` the sum of the lines.
    pub fn build(mut self) -> crate::SettlementRequest {
        self.request.total_fen = self.request.lines.iter().map(|l| l.amount_fen).sum();
        let covered: crate::Fen = self.request.prior.iter().map(|p| p.fund_pay_fen + p.account_pay_fen).sum();
        self.request.due_fen = self.due.unwrap_or(self.request.total_fen - covered);
        self.request
    }
}

/// Asserts what the gateway checks on every answer: the split balances exactly against what
/// was due, and nothing is negative.
#[track_caller]
pub fn assert_balances(split: &crate::Split, due_fen: crate::Fen) {
    if let Err(e) = split.check_balances(due_fen) {
        panic!("the split does not balance: {e}\n{split:#?}");
    }
}
