//! Role-based access control: built-in roles, the actions they grant (Azure's action
//! strings where Azure has one), and the decision `is_allowed`.
//!
//! A role assignment gives a principal a role at a scope; it applies to that scope and
//! everything under it (subscription > resource group > VM).

use crate::ids::Scope;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    PolicyRead,
    PolicyWrite,
    PolicyDelete,
    Initiate,
    VmRead,
    VmWrite,
    RequestRead,
    /// Revoke anybody's request. A requestor may always revoke their own.
    RequestRevoke,
    RequestApprove,
    /// Open access at once, without the approvals a rule asks for (break-glass).
    BreakGlass,
    AuditRead,
    TokenWrite,
    RoleAssignmentWrite,
    AgentReport,
}

impl Action {
    pub const ALL: [Action; 14] = [
        Action::PolicyRead,
        Action::PolicyWrite,
        Action::PolicyDelete,
        Action::Initiate,
        Action::VmRead,
        Action::VmWrite,
        Action::RequestRead,
        Action::RequestRevoke,
        Action::RequestApprove,
        Action::BreakGlass,
        Action::AuditRead,
        Action::TokenWrite,
        Action::RoleAssignmentWrite,
        Action::AgentReport,
    ];

    /// The action string, as in Azure's RBAC for the operations Azure has.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::PolicyRead => "Microsoft.Security/locations/jitNetworkAccessPolicies/read",
            Action::PolicyWrite => "Microsoft.Security/locations/jitNetworkAccessPolicies/write",
            Action::PolicyDelete => "Microsoft.Security/locations/jitNetworkAccessPolicies/delete",
            Action::Initiate => {
                "Microsoft.Security/locations/jitNetworkAccessPolicies/initiate/action"
            }
            Action::VmRead => "Microsoft.Compute/virtualMachines/read",
            Action::VmWrite => "Microsoft.Compute/virtualMachines/write",
            Action::RequestRead => {
                "Microsoft.Security/locations/jitNetworkAccessPolicies/requests/read"
            }
            Action::RequestRevoke => "Jitgate/requests/revoke/action",
            Action::RequestApprove => "Jitgate/requests/approve/action",
            Action::BreakGlass => "Jitgate/requests/breakGlass/action",
            Action::AuditRead => "Jitgate/audit/read",
            Action::TokenWrite => "Jitgate/tokens/write",
            Action::RoleAssignmentWrite => "Microsoft.Authorization/roleAssignments/write",
            Action::AgentReport => "Jitgate/agents/report/action",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Owner,
    JitAdministrator,
    JitRequester,
    JitApprover,
    /// Requests that open at once, without approvals, when an emergency cannot wait.
    JitBreakGlass,
    Reader,
    Agent,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Owner,
        Role::JitAdministrator,
        Role::JitRequester,
        Role::JitApprover,
        Role::JitBreakGlass,
        Role::Reader,
        Role::Agent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "Owner",
            Role::JitAdministrator => "JIT Administrator",
            Role::JitRequester => "JIT Requester",
            Role::JitApprover => "JIT Approver",
            Role::JitBreakGlass => "JIT Break-glass",
            Role::Reader => "Reader",
            Role::Agent => "Agent",
        }
    }

    /// Accepts the display name, case-insensitively, with or without spaces
    /// (`JIT Requester`, `jit-requester`, `JitRequester`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let norm = |x: &str| {
            x.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect::<String>()
                .to_ascii_lowercase()
        };
        let want = norm(s);
        Role::ALL
            .into_iter()
            .find(|r| norm(r.as_str()) == want)
            .ok_or_else(|| {
                let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("'{s}' is not a role (one of: {})", names.join(", "))
            })
    }

    pub fn actions(self) -> &'static [Action] {
        use Action::*;
        match self {
            Role::Owner => &Action::ALL,
            Role::JitAdministrator => &[
                PolicyRead,
                PolicyWrite,
                PolicyDelete,
                Initiate,
                VmRead,
                VmWrite,
                RequestRead,
                RequestRevoke,
                RequestApprove,
                AuditRead,
            ],
            Role::JitRequester => &[PolicyRead, Initiate, VmRead, RequestRead],
            Role::JitApprover => &[PolicyRead, VmRead, RequestRead, RequestApprove],
            Role::JitBreakGlass => &[PolicyRead, Initiate, VmRead, RequestRead, BreakGlass],
            Role::Reader => &[PolicyRead, VmRead, RequestRead, AuditRead],
            Role::Agent => &[AgentReport],
        }
    }

    pub fn permits(self, action: Action) -> bool {
        self.actions().contains(&action)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleAssignment {
    pub principal: String,
    pub role: Role,
    pub scope: Scope,
}

/// True when one of `assignments` gives `principal` the `action` on `target`.
pub fn is_allowed(
    assignments: &[RoleAssignment],
    principal: &str,
    action: Action,
    target: &Scope,
) -> bool {
    assignments
        .iter()
        .any(|a| a.principal == principal && a.role.permits(action) && a.scope.contains(target))
}

/// The scopes at which `principal` holds `action`: `is_allowed` on a target is true
/// exactly when one of them contains it. A store filters by these instead of asking
/// `is_allowed` row by row.
pub fn scopes_allowing(
    assignments: &[RoleAssignment],
    principal: &str,
    action: Action,
) -> Vec<Scope> {
    assignments
        .iter()
        .filter(|a| a.principal == principal && a.role.permits(action))
        .map(|a| a.scope.clone())
        .collect()
}

/// True when the principal holds `action` somewhere at or under `scope` (for example a
/// VM-scoped requester listing policies of the resource group: they may see the part
/// that concerns their VM).
pub fn is_allowed_somewhere_under(
    assignments: &[RoleAssignment],
    principal: &str,
    action: Action,
    scope: &Scope,
) -> bool {
    assignments.iter().any(|a| {
        a.principal == principal
            && a.role.permits(action)
            && (a.scope.contains(scope) || scope.contains(&a.scope))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

    fn scope(s: &str) -> Scope {
        Scope::parse(&s.replace("SUB", SUB)).unwrap()
    }

    fn vm(rg: &str, name: &str) -> Scope {
        scope(&format!(
            "/subscriptions/SUB/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
        ))
    }

    #[test]
    fn decisions_follow_roles_and_nested_scopes() {
        let a = vec![
            RoleAssignment {
                principal: "alice".into(),
                role: Role::JitRequester,
                scope: vm("rg", "web-1"),
            },
            RoleAssignment {
                principal: "bob".into(),
                role: Role::JitAdministrator,
                scope: scope("/subscriptions/SUB/resourceGroups/rg"),
            },
            RoleAssignment {
                principal: "root".into(),
                role: Role::Owner,
                scope: scope("/subscriptions/SUB"),
            },
            RoleAssignment {
                principal: "eve".into(),
                role: Role::Reader,
                scope: scope("/subscriptions/SUB"),
            },
        ];
        // (principal, action, target, expected)
        let table = [
            ("alice", Action::Initiate, vm("rg", "web-1"), true),
            ("alice", Action::Initiate, vm("rg", "web-2"), false),
            ("alice", Action::PolicyWrite, vm("rg", "web-1"), false),
            ("alice", Action::Initiate, vm("RG", "WEB-1"), true),
            (
                "bob",
                Action::PolicyWrite,
                scope("/subscriptions/SUB/resourceGroups/rg"),
                true,
            ),
            ("bob", Action::Initiate, vm("rg", "web-2"), true),
            ("bob", Action::Initiate, vm("other", "web-2"), false),
            (
                "bob",
                Action::TokenWrite,
                scope("/subscriptions/SUB"),
                false,
            ),
            (
                "root",
                Action::TokenWrite,
                scope("/subscriptions/SUB"),
                true,
            ),
            ("root", Action::Initiate, vm("any", "thing"), true),
            ("eve", Action::PolicyRead, vm("rg", "web-1"), true),
            ("eve", Action::Initiate, vm("rg", "web-1"), false),
            ("mallory", Action::PolicyRead, vm("rg", "web-1"), false),
        ];
        for (p, action, target, want) in table {
            assert_eq!(
                is_allowed(&a, p, action, &target),
                want,
                "{p} {action:?} {target}"
            );
            // The scopes a store filters by decide the same.
            let by_scopes = scopes_allowing(&a, p, action)
                .iter()
                .any(|s| s.contains(&target));
            assert_eq!(by_scopes, want, "scopes_allowing: {p} {action:?} {target}");
        }
        assert_eq!(
            scopes_allowing(&a, "alice", Action::VmRead),
            vec![vm("rg", "web-1")]
        );
        assert_eq!(scopes_allowing(&a, "alice", Action::TokenWrite), vec![]);
        assert!(is_allowed_somewhere_under(
            &a,
            "alice",
            Action::PolicyRead,
            &scope("/subscriptions/SUB/resourceGroups/rg")
        ));
        assert!(!is_allowed_somewhere_under(
            &a,
            "alice",
            Action::PolicyRead,
            &scope("/subscriptions/SUB/resourceGroups/rg2")
        ));
    }

    #[test]
    fn role_names_parse_loosely() {
        assert_eq!(Role::parse("JIT Requester").unwrap(), Role::JitRequester);
        assert_eq!(
            Role::parse("jit-administrator").unwrap(),
            Role::JitAdministrator
        );
        assert_eq!(Role::parse("owner").unwrap(), Role::Owner);
        assert!(Role::parse("God").is_err());
    }

    #[test]
    fn azure_action_strings() {
        assert_eq!(
            Action::Initiate.as_str(),
            "Microsoft.Security/locations/jitNetworkAccessPolicies/initiate/action"
        );
        assert!(
            Role::JitRequester.permits(Action::Initiate)
                && !Role::JitRequester.permits(Action::PolicyWrite)
        );
        assert!(
            Role::Reader.permits(Action::PolicyRead) && !Role::Reader.permits(Action::Initiate)
        );
    }
}
